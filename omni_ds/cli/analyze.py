"""Router analysis of an exported MoE model on a test set, with plots.

Writes OUT/analysis.json and four PNGs: per-layer expert usage (usage.png), per-layer routing
entropy (entropy.png), the cross-layer agreement matrix, i.e. the normalised mutual information
between the expert choices of every pair of MoE layers on non-pad frames (agreement.png), and
expert-index rasters (time x layer) for the first few utterances (rasters.png). It also runs the
random-routing ablation: the WER with every expert choice replaced by a uniformly random
expert, next to the normal WER (a larger increase suggests more specialised experts; the
Omni-router paper's text does not report this ablation's outcome, so compare the two models'
measured increases rather than expect an ordering). See ``omni_ds.eval.analysis`` for the exact
definitions.

    omni-ds analyze models/omni --test-set dev=data/dev --out analysis/omni

With ``--trace RUN_DIR`` it instead reads the routing trace a training run wrote
(``train.routing_trace_every``) and plots cross-layer NMI, usage entropy and expert load over
training steps (``omni_ds.eval.trace_analysis``) into RUN_DIR/analysis (or --out):

    omni-ds analyze --trace runs/omni
"""

from __future__ import annotations

import argparse

from omni_ds.cli.options import add_test_set_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL_DIR", nargs="?", help="written by omni-ds export (not with --trace)"
    )
    parser.add_argument(
        "--trace",
        metavar="RUN_DIR",
        default=None,
        help="plot the routing trace of a training run (train.routing_trace_every) instead",
    )
    add_test_set_argument(parser, repeatable=False, required=False)
    parser.add_argument(
        "--out", default=None, help="output directory (default: MODEL_DIR/analysis)"
    )
    parser.add_argument("--rasters", type=int, default=4, help="utterances to draw (default: 4)")
    parser.add_argument(
        "--batch-seconds", type=float, default=200.0, help="audio seconds per batch (default: 200)"
    )
    parser.add_argument(
        "--max-batches", type=int, default=0, help="analyse only this many batches; 0 = all"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-routing ablation")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def run_trace(args: argparse.Namespace) -> int:
    from omni_ds.eval.trace_analysis import analyze_trace

    curves, out = analyze_trace(args.trace, args.out)
    print(
        f"{args.trace}: {len(curves.steps)} traced steps ({curves.steps[0]}..{curves.steps[-1]}) "
        f"from {curves.ranks} rank(s); mean cross-layer NMI {curves.nmi[0]:.3f} -> "
        f"{curves.nmi[-1]:.3f}; wrote {out / 'trace.json'} and the trace plots"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.trace is not None:
        if args.model or args.test_set:
            raise SystemExit("--trace RUN_DIR takes no MODEL_DIR and no --test-set")
        return run_trace(args)
    if not args.model or not args.test_set:
        raise SystemExit("give MODEL_DIR and --test-set NAME=PATH (or --trace RUN_DIR)")
    import json
    from pathlib import Path

    import torch

    from data_pipeline.ordered import OrderedReader
    from omni_ds.ckpt.model_dir import load_model_dir
    from omni_ds.eval.analysis import RoutingCollector, set_random_routing
    from omni_ds.eval.inference import Transcriber, transcribe_batches
    from omni_ds.eval.plots import save_plots
    from omni_ds.eval.wer import score_set

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model_dir(args.model, device)
    moe = loaded.config.model.moe
    if moe.router == "dense":
        raise SystemExit(f"{args.model} is a dense model (router: dense): it has no routing")
    out = Path(args.out) if args.out else Path(args.model) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    transcriber = Transcriber(loaded)
    set_name, set_path = args.test_set
    reader = OrderedReader(set_path, batch_seconds=args.batch_seconds)

    def decode(desc: str, collector=None):
        return transcribe_batches(
            transcriber,
            reader,
            collector=collector,
            desc=desc,
            total=None if args.max_batches else reader.num_utterances,
            max_batches=args.max_batches,
        )

    collector = RoutingCollector(moe.num_experts, num_rasters=args.rasters)
    normal = decode("routing", collector)
    analysis = collector.result()
    wer = score_set(normal.refs, normal.hyps).wer
    set_random_routing(loaded.model, True)
    torch.manual_seed(args.seed)
    shuffled = decode("random routing")
    set_random_routing(loaded.model, False)
    wer_random = score_set(shuffled.refs, shuffled.hyps).wer

    name = Path(args.model).resolve().name
    report = {
        "model": str(args.model),
        "router": moe.router,
        "test_set": {"name": set_name, "path": set_path},
        "utterances": len(normal.keys),
        "wer": wer,
        "random_routing": {
            "wer": wer_random,
            "absolute_increase": wer_random - wer,
            "relative_increase": (wer_random - wer) / wer if wer else None,
        },
        **analysis.to_dict(),
    }
    (out / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = save_plots(analysis, out, title=f"{name} ({moe.router}) on {set_name}")
    print(
        f"{name}: WER {100 * wer:.2f}% -> {100 * wer_random:.2f}% with random routing; "
        f"mean cross-layer NMI {report['mean_offdiagonal_nmi']:.3f}; "
        f"wrote {out / 'analysis.json'} and {len(plots)} plots"
    )
    return 0
