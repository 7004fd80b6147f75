"""Inspect, reshard or consolidate a sharded DeepSpeed ZeRO + expert-parallel checkpoint.

    omni-ds ckpt inspect runs/omni                      # layout, step, sizes of the latest one
    omni-ds ckpt verify runs/omni                       # every checkpoint against its checksums
    omni-ds ckpt reshard runs/omni/checkpoints/step_400 --world-size 2 --ep-size 1 \\
        --out runs/omni2/checkpoints/step_400          # then: omni-ds train ... --resume auto
    omni-ds ckpt consolidate runs/omni --out omni.safetensors   # fp32, shared router once

CKPT is a run dir (its latest checkpoint), RUN_DIR/checkpoints, or a checkpoint tag dir. Resharding
rewrites weights, Adam moments, step and client state for the new layout; ``omni-ds train --resume
auto`` does the same by itself when the world size or ep_size changed. One CPU process, no launch.
``verify`` checks every file against the size and checksum its manifest recorded at save (of each
checkpoint of a run dir, or of one tag) and exits 1 when one does not match.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = sub.add_parser("inspect", help="print layout, step, world size, ep_size and sizes")
    inspect.add_argument("checkpoint", metavar="CKPT")
    verify = sub.add_parser("verify", help="check every file against the manifest's checksums")
    verify.add_argument("checkpoint", metavar="CKPT", help="a run dir (all its checkpoints), "
                        "RUN/checkpoints, or one tag dir")  # fmt: skip
    reshard = sub.add_parser("reshard", help="rewrite for another world size / ep_size")
    reshard.add_argument("checkpoint", metavar="CKPT")
    reshard.add_argument("--world-size", type=int, required=True, help="ranks of the new run")
    reshard.add_argument("--ep-size", type=int, required=True, help="model.moe.ep_size of it")
    reshard.add_argument("--out", required=True, metavar="DIR", help="new checkpoint tag dir")
    consolidate = sub.add_parser("consolidate", help="one fp32 safetensors file (ep_size=1 names)")
    consolidate.add_argument("checkpoint", metavar="CKPT")
    consolidate.add_argument("--out", required=True, metavar="FILE.safetensors")


def _size(paths) -> str:
    total = sum(p.stat().st_size for p in paths)
    return f"{total / 2**20:.1f} MiB"


def inspect(path: str) -> None:
    from omni_ds.ckpt.format import CLIENT_KEY, EXPERT_KEY, MAIN_FILE
    from omni_ds.ckpt.zero import ZeroCheckpoint

    ckpt = ZeroCheckpoint(path)
    main = ckpt.main
    client = main.get(CLIENT_KEY) or {}
    names = ckpt.names()
    experts = [n for n in names if EXPERT_KEY.match(n)]
    # DeepSpeed's BF16_Optimizer (bf16 ZeRO-1, fp32 gradient accumulation) records no stage
    stage = ckpt.shards[0].get("zero_stage")
    optimizer = f"ZeRO stage {int(stage)}" if stage is not None else "BF16_Optimizer (ZeRO-1)"
    numel = {n: ckpt.shape(n).numel() for n in names}
    dtypes = sorted({str(t.dtype) for t in main["module"].values() if t.is_floating_point()})
    print(f"{ckpt.tag_dir}: step {client.get('step', main.get('global_steps'))} "
          f"(DeepSpeed global_steps {main.get('global_steps')}, ds_version {main.get('ds_version')})")  # fmt: skip
    print(f"layout: world size {ckpt.world_size}, ep_size {ckpt.ep_size}, "
          f"{optimizer}, module {'/'.join(dtypes)}")  # fmt: skip
    print(f"parameters: {len(names)} tensors, {sum(numel.values()):,} values; dense "
          f"{len(names) - len(experts)} tensors ({sum(numel.values()) - sum(numel[n] for n in experts):,} values)")  # fmt: skip
    if ckpt.num_experts:
        print(f"experts: {len(ckpt.num_experts)} MoE layers x {max(ckpt.num_experts)} "
              f"({ckpt.experts_per_rank} per rank), {sum(numel[n] for n in experts):,} values")  # fmt: skip
    shared = main.get("shared_params") or {}
    if shared:
        print(f"shared: {len(shared)} aliases of {sorted(set(shared.values()))}")
    keys = sorted({k for g in range(len(ckpt.group_moe)) for k in ckpt.value_keys(g)})
    print(f"optimizer: {len(ckpt.group_moe)} groups, state {['fp32', *keys]}")
    print(f"files: main {_size([ckpt.tag_dir / MAIN_FILE])}, "
          f"{len(ckpt.expert_files)} expert files {_size(ckpt.expert_files)}, "
          f"{len(ckpt.zero_files)} ZeRO shards {_size(ckpt.zero_files)}")  # fmt: skip


def verify(path: str) -> int:
    """Print each checkpoint's verdict; 0 when all verify, 1 otherwise."""
    from pathlib import Path

    from omni_ds.ckpt.format import MANIFEST, resolve_tag_dir
    from omni_ds.ckpt.format import verify as problems
    from omni_ds.ckpt.select import saved_tags

    root = Path(path)
    tags = next((saved_tags(d) for d in (root / "checkpoints", root) if saved_tags(d)), [])
    if not tags:
        tags = [resolve_tag_dir(root)]
    bad = 0
    for tag in reversed(tags):
        found = problems(tag)
        bad += bool(found)
        files = [p for p in tag.iterdir() if p.name != MANIFEST]
        verdict = "DAMAGED" if found else "ok"
        print(f"{tag}: {verdict} ({len(files)} files, {_size(files)})")
        for line in found:
            print(f"  {line}")
    return 1 if bad else 0


def consolidate_to(path: str, out: str) -> None:
    import json

    from safetensors.torch import save_file

    from omni_ds.ckpt.consolidate import consolidate

    merged = consolidate(path)
    tensors = {k: v.contiguous() for k, v in merged.unique_state_dict().items()}
    meta = {"format": "omni-ds", "tied": json.dumps(merged.shared, sort_keys=True),
            "source": str(merged.tag_dir), "global_steps": str(merged.global_steps),
            "fp32_masters": str(merged.fp32_masters).lower()}  # fmt: skip
    save_file(tensors, out, metadata=meta)
    print(f"wrote {out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} "
          f"values, step {merged.global_steps} of {merged.tag_dir}")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.action == "inspect":
        inspect(args.checkpoint)
    elif args.action == "verify":
        return verify(args.checkpoint)
    elif args.action == "reshard":
        from omni_ds.ckpt.reshard import reshard

        out = reshard(args.checkpoint, args.out, world_size=args.world_size,
                      ep_size=args.ep_size, progress=True)  # fmt: skip
        print(f"wrote {out} for {args.world_size} ranks with ep_size {args.ep_size}")
    else:
        consolidate_to(args.checkpoint, args.out)
    return 0
