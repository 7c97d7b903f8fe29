"""The GPU proof script: its arithmetic on a hand-made log, and the whole script
run on a CPU in its --tiny mode (the same stages, tiny sizes), without
TensorFlow as on the GPU image."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, with_sitecustomize

sys.path.insert(0, str(REPO / "benchmarks"))


def _stamped(lines):
  return "\n".join(f"{at:9.2f} {text}" for at, text in lines) + "\n"


def test_job_phases_and_projection_from_a_stamped_log(tmp_path):
  import gpu_proof

  log = (
      _stamped(
          [
              (0.0, "I main.py] Devices: 1 (gpu), processes: 1"),
              (30.0, "I train.py] Compiled the epoch on the device (bce_dice) in 40.0 s."),
              (30.5, "I train.py] Compiled the epoch on the device (bce_dice) in 2.5 s."),
              (
                  75.0,
                  "I train.py] fold 0 epoch   1/3  loss 1.0  val score 0.1  val IoU 0.2  lr 1e-4  45.0s  300 img/s",
              ),
              (
                  75.0,
                  "I train.py] fold 1 epoch   1/3  loss 1.0  val score 0.1  val IoU 0.2  lr 1e-4  45.0s  300 img/s",
              ),
              (
                  78.0,
                  "I train.py] fold 0 epoch   2/3  loss 1.0  val score 0.1  val IoU 0.2  lr 1e-4  3.0s  5000 img/s",
              ),
              (
                  82.0,
                  "I train.py] fold 0 epoch   3/3  loss 1.0  val score 0.1  val IoU 0.2  lr 1e-4  4.0s  4000 img/s",
              ),
              (100.5, "OOF score 0.7000 at threshold 0.50; wrote submission.csv"),
          ]
      )
      + "job: exit 0\n"
  )
  workdir = tmp_path / "job"
  for fold in (0, 1):
    (workdir / f"fold_{fold}").mkdir(parents=True)
    history = [
        {"seconds": s, "images_per_second": i} for s, i in ((45.0, 300), (3.0, 5000), (4.0, 4000))
    ]
    (workdir / f"fold_{fold}" / "done.json").write_text(json.dumps({"history": history}))
  summary = gpu_proof.job_summary(gpu_proof.parse_job_log(log), workdir, epochs=3)
  assert summary["finished"] and summary["folds"] == 2 and summary["epochs"] == 3
  assert summary["compile_s"] == {"the epoch on the device (bce_dice)": 42.5}
  assert summary["set_up_s"] == 30.0  # first epoch logged at 75 s, after 45 s of epoch
  assert summary["steady_epoch_s"] == 3.5  # median of 3 and 4
  assert summary["prediction_s"] == 18.5  # 100.5 - 82
  # set-up + first epoch + 149 steady epochs + prediction
  assert summary["projected_150_epoch_job_s"] == pytest.approx(30 + 45 + 149 * 3.5 + 18.5)


# Every Python process of the script as on the GPU image it is made for, where
# TensorFlow (and so tensorflow-datasets and the TensorBoard writer) cannot be imported:
# the whole job (use_tfds=False, the on-device input pipeline) must train,
# predict and submit without it.
_NO_TENSORFLOW = """
import sys
for name in ("tensorflow", "tensorflow_datasets"):
  sys.modules[name] = None
"""


def test_gpu_proof_runs_every_stage_in_tiny_mode_without_tensorflow(tmp_path):
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      # This interpreter, not whichever python3 comes first on PATH (another
      # one, without jax, when the venv is not activated).
      "PYTHON": sys.executable,
      **with_sitecustomize(tmp_path / "no_tensorflow", _NO_TENSORFLOW),
      "RESULTS_DIR": str(tmp_path / "results"),
      "WORK": str(tmp_path / "work"),
      "RUN_ID": "tiny",
  }
  result = subprocess.run(
      ["bash", "benchmarks/gpu_proof.sh", "--tiny"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=1800,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  proof = json.loads((tmp_path / "results" / "gpu_proof_tiny.json").read_text())
  assert proof["tiny"]
  rows = {(r["folds"], r["batch_size"]): r for r in proof["ours"]["train"]}
  assert set(rows) == {(1, 4), (2, 4)}
  assert all(r["images_per_s"] > 0 and r["loss_finite"] for r in proof["ours"]["train"])
  # The two folds timed both ways a program goes over them.
  strategies = [r["fold_strategy"] for r in proof["ours"]["train"] if r["folds"] == 2]
  assert sorted(strategies) == ["in_turn", "vmap"]
  job = proof["job"]
  assert job["finished"], job
  assert job["folds"] == 2 and job["epochs"] == 2
  assert job["compile_s"] and job["steady_epoch_s"] > 0 and job["prediction_s"] > 0
  assert job["projected_150_epoch_job_s"] > job["job_s"]
  assert 0 <= job["oof_score"] <= 1
  assert "TensorFlow is not installed" in (tmp_path / "work" / "job.log").read_text()
  submission = (tmp_path / "work" / "job" / "submission.csv").read_text().splitlines()
  assert submission[0] == "id,rle_mask" and len(submission) == 1 + 8  # the tiny job's test images
  assert (tmp_path / "results" / "gpu_proof_tiny.md").read_text().startswith("# GPU proof")
