"""Students trained on one square size against students trained on buckets, per bucket, paired by seed.

Scores each seed's square-only student (a `ladd demo` folder's runs/seed-k) on a bucket demo's eval set
(its data/eval: the same prompts and eval noise the bucket students were scored on), then prints, per
bucket, both students' KID and caption accuracy per seed and the paired difference (bucket − square)
as mean ± SE over seeds. The square-only scores are cached in --cache.

    ladd demo && ladd demo --buckets toy
    python bench/square_vs_buckets.py --square runs/demo --buckets runs/demo-buckets

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ladd.demo import paired_difference
from ladd.eval.commands import EvalConfig, evaluate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--square", required=True, help="a `ladd demo` folder trained on one square size")
    ap.add_argument("--buckets", required=True, help="a `ladd demo --buckets` folder, with the same seeds")
    ap.add_argument("--cache", default=None,
                    help="where the square students' scores on BUCKETS' eval set go (default BUCKETS/square-only)")
    args = ap.parse_args()
    square, buckets = Path(args.square), Path(args.buckets)
    cache = Path(args.cache) if args.cache else buckets / "square-only"
    cache.mkdir(parents=True, exist_ok=True)
    demo = json.loads((buckets / "report.json").read_text())  # score as that demo scored its own students
    cfg, pipeline = demo["config"], demo["train_config"]["model"]["pipeline"]
    ema = json.loads((square / "report.json").read_text())["train_config"]["train"]["ema_decay"] > 0
    seeds = sorted(p.name for p in (buckets / "runs").glob("seed-*"))
    sq, bk = [], []
    for seed in seeds:
        f = cache / f"{seed}.json"
        if not f.is_file():
            r = evaluate(EvalConfig(data=str(buckets / "data" / "eval"), source="run", path=str(square / "runs" / seed),
                                    ema=ema, features=cfg["features"], subsets=cfg["subsets"],
                                    subset_size=cfg["subset_size"], pipeline=pipeline, batch_size=cfg["eval_batch"]))
            f.write_text(json.dumps(r, indent=1))
        sq.append(json.loads(f.read_text())["rows"][0])
        bk.append(json.loads((buckets / "runs" / seed / "eval.json").read_text())["rows"][0])
    out = {}
    for name in ["all", *bk[0]["buckets"]]:
        def pick(rows, key):
            at = [r if name == "all" else r["buckets"][name] for r in rows]
            return [a["kid"]["mean"] if key == "kid" else a["caption_accuracy"]["all"] for a in at]
        out[name] = {key: {"square": pick(sq, key), "buckets": pick(bk, key),
                           "buckets_minus_square": paired_difference(pick(bk, key), pick(sq, key))}
                     for key in ("kid", "captions")}
        k, c = out[name]["kid"]["buckets_minus_square"], out[name]["captions"]["buckets_minus_square"]
        print(f"{name:>6}: KID buckets − square {k['mean']:+.4f} ± {k['se']:.4f}, "
              f"captions {c['mean']:+.3f} ± {c['se']:.3f}")
    print(json.dumps({"seeds": seeds, **out}))


if __name__ == "__main__":
    main()
