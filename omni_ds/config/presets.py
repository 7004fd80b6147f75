"""The files omni-ds ships: experiment presets (``configs/``), DeepSpeed JSONs (``ds_configs/``)
and SLURM scripts (``slurm/``), found by path or by name.

    find("configs/tiny.yaml", "configs")   # that file when it exists (relative to the cwd)
    find("omni_8x84m", "configs")          # the shipped configs/omni_8x84m.yaml
    find("zero2_bf16.json", "ds_configs")  # the shipped ds_configs/zero2_bf16.json

In a source checkout (and its editable install) the shipped files are the repository's folders;
a wheel carries them inside the package as ``omni_ds/configs/`` etc. (``setup.py`` maps them).
"""

from __future__ import annotations

from pathlib import Path

SUFFIX = {"configs": ".yaml", "ds_configs": ".json", "slurm": ".sbatch"}


def shipped_dir(kind: str) -> Path:
    """The folder of shipped files of ``kind`` (``configs``, ``ds_configs`` or ``slurm``)."""
    package = Path(__file__).resolve().parents[1]
    # A wheel first: beside an installed package the parent is site-packages, not a checkout.
    for base in (package, package.parent):
        if (base / kind).is_dir():
            return base / kind
    raise FileNotFoundError(f"omni-ds ships no {kind}/ folder next to {package}; reinstall it")


def find(name: str | Path, kind: str) -> Path:
    """``name`` when it is a file; else the shipped file it names: a bare name with or without
    its suffix, or ``<kind>/<name>`` as the presets and README spell it. Returns ``name``
    unchanged when neither exists, for the caller to report."""
    path = Path(name)
    if path.is_file():
        return path
    parts = path.parts
    if len(parts) == 2 and parts[0] == kind:
        path = Path(parts[1])
    if len(path.parts) == 1:
        folder = shipped_dir(kind)
        for candidate in (folder / path.name, folder / f"{path.name}{SUFFIX[kind]}"):
            if candidate.is_file():
                return candidate
    return Path(name)


def names(kind: str) -> list[str]:
    """The shipped names of ``kind``, for messages."""
    return sorted(p.stem for p in shipped_dir(kind).glob(f"*{SUFFIX[kind]}"))
