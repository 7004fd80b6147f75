"""DeepSpeed's own reading of its config: the keys its parser knows and what its pydantic models
reject, reported every one at once with a did-you-mean (``omni-ds check-config``).

The known top-level keys are *recorded* from DeepSpeed's parser (:func:`deepspeed_top_level_keys`)
rather than listed here, so a DeepSpeed upgrade brings its new keys along; nested sections are
checked by DeepSpeed's pydantic models.
"""

from __future__ import annotations

import difflib
import functools


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else "remove it (DeepSpeed ignores it)"


@functools.lru_cache(maxsize=1)
def deepspeed_top_level_keys() -> frozenset[str]:
    """Every top-level key DeepSpeed's config parser looks up, recorded while it parses."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Keys(list):
        def __contains__(self, key):
            seen.add(key)
            return list.__contains__(self, key)

    class Recorder(dict):
        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def keys(self):
            return Keys(super().keys())

    DeepSpeedConfig(Recorder(train_micro_batch_size_per_gpu=1))
    # Read by DeepSpeedConfig only under an initialised process group (Ulysses).
    seen.add("sequence_parallel_size")
    return frozenset(k for k in seen if isinstance(k, str))


def _pydantic_model(name: str):
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _field_names(cls) -> list[str]:
    names = []
    for name, field in cls.model_fields.items():
        names.append(name)
        if field.alias:
            names.append(field.alias)
    return names


def _nested_model(cls, key: str):
    """The pydantic model class of field ``key`` of ``cls`` (through Optional/Union)."""
    import typing

    for name, field in cls.model_fields.items():
        if key in (name, field.alias):
            todo = [field.annotation]
            while todo:
                tp = todo.pop()
                if isinstance(tp, type) and hasattr(tp, "model_fields"):
                    return tp
                todo.extend(typing.get_args(tp))
    return None


def _section_of(ds: dict, first: str) -> str:
    if first in ds:
        return ""
    for key, value in ds.items():
        if isinstance(value, dict) and first in value:
            return key
    return ""


def check_deepspeed_json(ds: dict, where: str = "deepspeed") -> list[str]:
    """Problems DeepSpeed's own parser sees (unknown keys, bad values) plus unknown top-level keys."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    problems = []
    known = sorted(deepspeed_top_level_keys())
    for key in ds:
        if key not in known:
            problems.append(f"{where}: {key}: unknown DeepSpeed key; {_did_you_mean(key, known)}")
    # Batch sizes are checked against the real world size below, not DeepSpeed's default of 1.
    probe = {k: v for k, v in ds.items() if k in known and "batch" not in k}
    probe.pop("gradient_accumulation_steps", None)
    probe["train_micro_batch_size_per_gpu"] = 1
    if all(isinstance(probe.get(k), dict) and probe[k].get("enabled") for k in ("fp16", "bf16")):
        probe.pop("bf16")  # reported once, by the precision check
    # DeepSpeed stops at the first bad section; drop it and parse again to report every one.
    for _ in range(len(probe)):
        try:
            DeepSpeedConfig(probe)
            break
        except pydantic.ValidationError as e:
            model = _pydantic_model(e.title)
            for err in e.errors():
                loc = [str(p) for p in err["loc"]]
                section = _section_of(ds, loc[0]) if loc else ""
                problems.append(_describe(err, loc, section, model, where))
                probe.pop(section or (loc[0] if loc else ""), None)
        except (AssertionError, ValueError) as e:
            problems.append(f"{where}: DeepSpeed rejects the config: {e}")
            break
    return problems


def _describe(err: dict, loc: list[str], section: str, model, where: str) -> str:
    dotted = ".".join(([section] if section else []) + loc)
    if err["type"] == "extra_forbidden" and model is not None:
        cls = model
        for part in loc[:-1]:
            cls = _nested_model(cls, part) if cls is not None else None
        options = _field_names(cls) if cls is not None else []
        return f"{where}: {dotted}: unknown DeepSpeed key; {_did_you_mean(loc[-1], options)}"
    return f"{where}: {dotted}: {err.get('input')!r} is invalid: {err['msg']}; fix the value"
