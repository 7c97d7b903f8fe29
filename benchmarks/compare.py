"""Ours against the peer, batch size by batch size, from two result JSONs.

python benchmarks/compare.py OURS.json PEER.json [--output COMPARE.json]

OURS.json comes from train_throughput.py, PEER.json from peer_smp_pytorch.py,
both from the same run on the same machine (benchmarks/run_gpu.sh): timings
of different runs or machines are not comparable, and this script says so when
the two files disagree on the device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib


def _by_batch(rows: list[dict]) -> dict[str, dict]:
  """Rows by setting: 'B' for one model at batch B, 'FxB' for F fold models together
  ('FxB in_turn', 'FxB vmap' where the row names its fold strategy)."""
  return {_setting(r): r for r in rows}


def _setting(row: dict) -> str:
  folds = row.get("folds", 1)
  if folds == 1:
    return str(row["batch_size"])
  strategy = row.get("fold_strategy")
  return f"{folds}x{row['batch_size']}" + (f" {strategy}" if strategy else "")


def _batch(setting: str) -> str:
  """The one-model batch B of a setting: what the peer runs F times, one fold after another."""
  return setting.split()[0].rpartition("x")[2]


def _order(setting: str) -> tuple:
  sizes, _, strategy = setting.partition(" ")
  folds, _, batch = sizes.rpartition("x")
  return (int(batch), int(folds or 1), strategy)


def compare(ours: dict, peer: dict) -> dict:
  warnings = []
  kinds = (ours["device"]["device_kind"], peer["device"]["device_kind"])
  if kinds[0] != kinds[1]:
    warnings.append(f"different devices: ours on {kinds[0]!r}, peer on {kinds[1]!r}")
  if ours["device"].get("host") != peer["device"].get("host"):
    warnings.append("different hosts: timings are only comparable within one machine")
  when = [datetime.datetime.fromisoformat(r["date"]) for r in (ours, peer)]
  if abs((when[0] - when[1]).total_seconds()) > 3 * 3600:
    warnings.append("the two runs are more than 3 hours apart")
  tables = {}
  for kind in ("train", "tta"):
    a, b = _by_batch(ours.get(kind, [])), _by_batch(peer.get(kind, []))
    rows = []
    for size in sorted(set(a) | set(b), key=_order):
      # F fold models at batch B together against the peer's way of training
      # F folds: one model at batch B after another (its images/s at B).
      x, y = a.get(size, {}), b.get(_batch(size), {})
      row = {
          "batch_size": size,
          "ours_images_per_s": x.get("images_per_s"),
          "peer_images_per_s": y.get("images_per_s"),
          "ours_error": x.get("error"),
          "peer_error": y.get("error"),
      }
      if row["ours_images_per_s"] and row["peer_images_per_s"]:
        row["ratio_ours_over_peer"] = row["ours_images_per_s"] / row["peer_images_per_s"]
      rows.append(row)
    tables[kind] = rows
  best = {}
  for kind, rows in tables.items():
    ours_best = max((r["ours_images_per_s"] or 0 for r in rows), default=0)
    peer_best = max((r["peer_images_per_s"] or 0 for r in rows), default=0)
    if ours_best and peer_best:
      best[kind] = {
          "ours_images_per_s": ours_best,
          "peer_images_per_s": peer_best,
          "ratio_ours_over_peer": ours_best / peer_best,
      }
  return {
      "device": kinds[0],
      "ours_date": ours["date"],
      "peer_date": peer["date"],
      "ours_versions": ours.get("versions"),
      "peer_versions": peer.get("versions"),
      "ours_settings": ours.get("settings"),
      "peer_settings": peer.get("settings"),
      "warnings": warnings,
      "train": tables["train"],
      "tta": tables["tta"],
      "best": best,
  }


def format_markdown(result: dict) -> str:
  lines = [f"Device: {result['device']}"]
  lines += [f"WARNING: {w}" for w in result["warnings"]]
  for kind, title in (("train", "Training step"), ("tta", "TTA inference (hflip)")):
    if not result[kind]:
      continue
    lines += [
        "",
        f"{title}:",
        "",
        "| batch (F folds x B) | saltjax images/s | smp+torch images/s (at B) | ours / peer |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in result[kind]:
      ours = f"{r['ours_images_per_s']:.0f}" if r["ours_images_per_s"] else (r["ours_error"] or "-")
      peer = f"{r['peer_images_per_s']:.0f}" if r["peer_images_per_s"] else (r["peer_error"] or "-")
      ratio = f"{r['ratio_ours_over_peer']:.2f}x" if "ratio_ours_over_peer" in r else "-"
      lines.append(f"| {r['batch_size']} | {ours[:40]} | {peer[:40]} | {ratio} |")
  for kind, b in result["best"].items():
    lines.append(
        f"\nBest {kind}: ours {b['ours_images_per_s']:.0f} vs peer"
        f" {b['peer_images_per_s']:.0f} images/s ({b['ratio_ours_over_peer']:.2f}x)"
    )
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("ours")
  p.add_argument("peer")
  p.add_argument("--output", default="")
  args = p.parse_args(argv)
  result = compare(
      json.loads(pathlib.Path(args.ours).read_text()),
      json.loads(pathlib.Path(args.peer).read_text()),
  )
  result["ours_file"], result["peer_file"] = args.ours, args.peer
  print(format_markdown(result))
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.output}")
  return result


if __name__ == "__main__":
  main()
