"""The helpers of benchmarks/gpu_proof.sh: time-stamp a job's log, then summarize the run.

  python main.py ... 2>&1 | python benchmarks/gpu_proof.py stamp > job.log
  python benchmarks/gpu_proof.py summarize --ours OURS.json --peer PEER.json \
      --job_log job.log --workdir WORKDIR --epochs 20 --output results/gpu_proof_<id>

`summarize` writes <output>.json and <output>.md: (a) ours against the peer
(benchmarks/compare.py's table), (b) the job's phases — set-up before the
first epoch (data, model, checks), compile seconds of each program, the first
epoch (compiling included), the median of the later epochs, prediction, the
whole job — and the projected 150-epoch total: set-up + first epoch + 149
steady epochs + prediction.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import compare  # noqa: E402  (beside this script)
import report  # noqa: E402

FULL_EPOCHS = 150
_COMPILED = re.compile(r"Compiled (.+) in ([\d.]+) s\.")
_EPOCH = re.compile(r"fold (\d+) epoch +(\d+)/(\d+) .* ([\d.]+)s +(\d+) img/s")


def stamp(lines, out) -> None:
  """Each line prefixed with the seconds since the first one came."""
  started = time.monotonic()
  for line in lines:
    out.write(f"{time.monotonic() - started:9.2f} {line}")
    out.flush()


def parse_job_log(text: str) -> dict:
  """Phases of a stamped main.py log."""
  compiled, epoch_at, end, exit_code, oof = {}, {}, 0.0, None, None
  for line in text.splitlines():
    if line.startswith("job: exit"):  # the shell's own line, after the job
      exit_code = int(line.split()[-1])
      continue
    at, _, message = line.strip().partition(" ")
    try:
      at = float(at)
    except ValueError:
      continue
    end = at
    if m := _COMPILED.search(message):
      compiled[m.group(1)] = compiled.get(m.group(1), 0.0) + float(m.group(2))
    elif m := _EPOCH.search(message):
      epoch_at[int(m.group(2))] = at
    elif m := re.search(r"OOF score ([\d.]+)", message):
      oof = float(m.group(1))
  return {
      "compile_s": compiled,
      "epoch_logged_at_s": epoch_at,
      "job_s": end,
      "exit_code": exit_code,
      "oof_score": oof,
  }


def job_summary(log: dict, workdir: pathlib.Path, epochs: int) -> dict:
  histories = [
      json.loads(p.read_text())["history"] for p in sorted(workdir.glob("fold_*/done.json"))
  ]
  if not histories or not log["epoch_logged_at_s"]:
    return {"finished": False, **log}
  seconds = [h["seconds"] for h in histories[0]]  # the folds train together: one clock
  images = [h.get("images_per_second") for h in histories[0]]
  steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
  first_logged = log["epoch_logged_at_s"][min(log["epoch_logged_at_s"])]
  last_logged = log["epoch_logged_at_s"][max(log["epoch_logged_at_s"])]
  set_up = first_logged - seconds[0]
  predict = log["job_s"] - last_logged
  scores = workdir / "scores.json"
  return {
      "finished": log["exit_code"] == 0 and len(histories[0]) == epochs,
      "folds": len(histories),
      "epochs": len(histories[0]),
      "set_up_s": round(set_up, 1),
      "compile_s": {k: round(v, 1) for k, v in log["compile_s"].items()},
      "first_epoch_s": round(seconds[0], 2),
      "steady_epoch_s": round(steady, 3),
      "steady_images_per_s": round(statistics.median(images[1:] or images), 1)
      if all(images)
      else None,
      "prediction_s": round(predict, 1),
      "job_s": round(log["job_s"], 1),
      "projected_150_epoch_job_s": round(
          set_up + seconds[0] + (FULL_EPOCHS - 1) * steady + predict, 1
      ),
      "oof_score": json.loads(scores.read_text()).get("oof_score") if scores.exists() else None,
      "exit_code": log["exit_code"],
  }


def markdown(result: dict) -> str:
  lines = [
      f"# GPU proof {result['date'][:10]}: {result['device']}",
      "",
      f"commit {result['git_commit']}; {'TINY (a CPU smoke run)' if result['tiny'] else ''}",
  ]
  if result.get("versus_peer"):
    lines += ["", "## (a) Train step, ours against smp + PyTorch", ""]
    lines.append(compare.format_markdown(result["versus_peer"]))
  elif result.get("ours"):
    lines += [
        "",
        "## (a) Train step (no peer run)",
        "",
        "| folds x batch | images/s |",
        "| --- | --- |",
    ]
    for r in result["ours"]["train"]:
      strategy = f" ({r['fold_strategy']})" if r.get("fold_strategy") else ""
      lines.append(
          f"| {r.get('folds', 1)} x {r['batch_size']}{strategy}"
          f" | {r.get('images_per_s', r.get('error'))} |"
      )
  job = result.get("job") or {}
  if job.get("finished") is not None:
    lines += ["", "## (b) The whole fold.py job (TGS size, synthetic data)", ""]
    lines += ["| what | value |", "| --- | --- |"]
    for key, value in job.items():
      lines.append(f"| {key} | {value} |")
  return "\n".join(lines) + "\n"


def summarize(args) -> dict:
  load = (
      lambda p: json.loads(pathlib.Path(p).read_text()) if p and pathlib.Path(p).exists() else None
  )
  ours, peer = load(args.ours), load(args.peer)
  job_log = pathlib.Path(args.job_log)
  job = (
      job_summary(parse_job_log(job_log.read_text()), pathlib.Path(args.workdir), args.epochs)
      if job_log.exists()
      else None
  )
  device = (ours or {}).get("device", {}).get("device_kind", "unknown")
  result = {
      "benchmark": "gpu_proof",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": device,
      "tiny": args.tiny,
      "git_commit": report.git_commit(),
      "versions": report.versions(("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch")),
      "ours": ours,
      "peer": peer,
      "versus_peer": compare.compare(ours, peer) if ours and peer else None,
      "job": job,
  }
  out = pathlib.Path(args.output)
  out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
  out.with_suffix(".md").write_text(markdown(result))
  print(markdown(result))
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("stamp")
  s = sub.add_parser("summarize")
  s.add_argument("--ours", default="")
  s.add_argument("--peer", default="")
  s.add_argument("--job_log", default="")
  s.add_argument("--workdir", default="")
  s.add_argument("--epochs", type=int, required=True)
  s.add_argument("--output", required=True, help="path without suffix: .json and .md are added")
  s.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)
  if args.command == "stamp":
    stamp(sys.stdin, sys.stdout)
  else:
    summarize(args)


if __name__ == "__main__":
  main()
