"""End to end on a model trained inside the test: 2 ranks, ZeRO-2, ep_size=2, omni router →
``omni-ds export`` → ``transcribe`` / ``eval`` / ``analyze`` on real FLAC and Ogg shards (without
an index.json) and manifests."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import jiwer
import matplotlib.image
import numpy as np
import pytest
import soundfile as sf
import torch
from harness import child_pythonpath, run_function
from synth_speech import utterance

from omni_ds.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SENTENCES = [
    "a seat", "eat tea", "test a toe", "see tao",
    "oat at sea", "tease ten eels", "ten toes", "a neat nest",
]  # fmt: skip
STEPS = 150
OVERRIDES = [
    "model.vocab_size=13",
    "model.dropout=0.0",
    "model.frontend.specaug.freq_masks=0",
    "model.frontend.specaug.time_masks=0",
    "model.moe.ep_size=2",
]


def train_tokenizer(out: Path) -> Path:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_prefix=str(out / "sp"), vocab_size=13,
        model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    return out / "sp.model"


def waves(ids: list[list[int]]) -> list[np.ndarray]:
    return [utterance(t, seed=i).astype(np.float32) for i, t in enumerate(ids)]


def train_tiny(ckpt_dir: str, ids: list[list[int]]) -> list[list[int]]:
    """Rank worker: save step_0, overfit the 8 sentences (4 per rank), save, decode all 8 live."""
    from data_pipeline.reader import pad
    from omni_ds import dist
    from omni_ds.config.experiment import load_config
    from omni_ds.model.decode import ctc_greedy
    from omni_ds.model.encoder import build_model
    from omni_ds.train.engine import build_engine

    with dist.distributed() as info:
        torch.manual_seed(0)
        model = build_model(load_config(CONFIGS / "tiny.yaml", OVERRIDES).model)
        ds = {
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
            "zero_optimization": {"stage": 2},
        }
        engine = build_engine(model, ds)
        engine.save_checkpoint(ckpt_dir, tag="step_0")
        mine = ids[info.env.rank :: 2]
        audio, lens = pad(waves(ids)[info.env.rank :: 2], np.float32)
        tokens = torch.zeros(len(mine), max(map(len, mine)), dtype=torch.long)
        for i, t in enumerate(mine):
            tokens[i, : len(t)] = torch.tensor(t)
        token_lens = torch.tensor([len(t) for t in mine])
        for _ in range(STEPS):
            loss = model.loss(engine(audio, lens), tokens, token_lens).total
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(ckpt_dir, tag=f"step_{STEPS}")
        engine.eval()
        audio, lens = pad(waves(ids), np.float32)
        with torch.no_grad():
            out = engine(audio, lens)
        return ctc_greedy(out.logits, out.out_lens)


def write_tars(shards: Path, audio: list[tuple[str, bytes]]) -> None:
    """``(name, bytes)`` of the 8 utterances' audio as 2 tar shards with their labels."""
    shards.mkdir(parents=True)
    for s in range(2):
        with tarfile.open(shards / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(4 * s, 4 * s + 4):
                label = json.dumps({"text": SENTENCES[i]}).encode()
                for member, blob in (audio[i], (f"utt{i}.json", label)):
                    info = tarfile.TarInfo(member)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))


def write_test_sets(root: Path, ids: list[list[int]]) -> tuple[Path, Path, Path, list[Path]]:
    """The 8 utterances as FLAC files, as 2 tar shards of FLAC, 2 of Ogg Vorbis and as a JSONL
    manifest."""
    files, rows, ogg = [], [], []
    for i, (wave, text) in enumerate(zip(waves(ids), SENTENCES)):
        path = root / f"utt{i}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wave, 16000, subtype="PCM_24")
        files.append(path)
        rows.append({"audio_filepath": path.name, "text": text.upper() + "."})
        buf = io.BytesIO()
        sf.write(buf, wave, 16000, format="OGG", subtype="VORBIS")
        ogg.append((f"utt{i}.ogg", buf.getvalue()))
    write_tars(root / "shards", [(f.name, f.read_bytes()) for f in files])
    write_tars(root / "ogg", ogg)
    manifest = root / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "shards", root / "ogg", manifest, files


def readme_example_equals_transcribe(work: Path, model: Path, files, greedy, beam) -> None:
    """README's "Python API" block, run as it is on this model and two of the files."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (work / "models").mkdir(parents=True)
    (work / "models" / "omni").symlink_to(model.resolve())
    (work / "a.flac").write_bytes(files[0].read_bytes())
    wave, rate = sf.read(files[1])
    sf.write(work / "b.wav", wave, rate, subtype="PCM_24")  # another container, the same samples
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}
    done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [greedy[0], "omni 16000 2 4"]
    import omni_ds

    api = omni_ds.load_model(model, device="cpu")
    assert api.transcribe([str(f) for f in files]) == greedy
    assert api.transcribe(files, beam_size=4) == beam
    samples, _ = sf.read(files[2], dtype="float32")
    assert api.transcribe(samples) == greedy[2]  # an array, as the file decodes
    routing = api.routing([files[0], files[1]])
    assert [r.experts.shape[0] for r in routing] == [4, 4] and routing[0].experts.max() < 4
    assert api.config.model.moe.router == "omni" and api.config.model.moe.ep_size == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_trained_model_export_transcribe_eval_analyze(tmp_path, capsys):
    import sentencepiece as spm
    import yaml

    from omni_ds.config.experiment import load_config
    from omni_ds.config.loading import to_dict

    sp_model = train_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = [sp.encode(s) for s in SENTENCES]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    live = run_function(train_tiny, 2, args=(str(run / "checkpoints"), ids), timeout=400)
    assert live[0] == live[1]
    live_texts = [sp.decode(x) for x in live[0]]
    assert jiwer.wer(SENTENCES, live_texts) < 0.2  # it learned something
    cfg = load_config(CONFIGS / "tiny.yaml", OVERRIDES)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))

    trained, untrained = tmp_path / "omni", tmp_path / "untrained"
    assert main(["export", str(run), "--out", str(trained), "--tokenizer", str(sp_model)]) == 0
    step0 = ["export", str(run / "checkpoints" / "step_0"), "--out", str(untrained)]
    assert main([*step0, "--tokenizer", str(sp_model)]) == 0
    shards, ogg, manifest, files = write_test_sets(tmp_path / "data", ids)
    capsys.readouterr()

    # transcribe: exactly what the live (2-rank, ep_size=2) model decoded before export
    assert main(["transcribe", str(trained), *map(str, files), "--batch-size", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t") for line in lines] == [[str(f), t] for f, t in zip(files, live_texts)]
    assert main(["transcribe", str(trained), *map(str, files), "--beam-size", "4"]) == 0
    beam = [line.split("\t")[1] for line in capsys.readouterr().out.strip().splitlines()]
    assert jiwer.wer(SENTENCES, beam) <= jiwer.wer(SENTENCES, live_texts) + 0.05
    readme_example_equals_transcribe(tmp_path / "readme", trained, files, live_texts, beam)

    # eval: two models, three sets; WERs are jiwer's on the normalised texts
    out = tmp_path / "eval"
    sets = ["--test-set", f"shards={shards}", "--test-set", f"manifest={manifest}",
            "--test-set", f"ogg={ogg}"]  # fmt: skip
    assert main(["eval", str(untrained), str(trained), *sets, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    by_model = {m["model"]: m for m in report["models"]}
    expected = jiwer.wer(SENTENCES, [t.lower() for t in live_texts])
    for name in ("shards", "manifest"):  # manifest refs are upper case with a full stop
        assert by_model["omni"]["sets"][name]["wer"] == pytest.approx(expected, abs=1e-12)
    # Lossy Vorbis: scored like the others, every utterance, close to the FLAC WER.
    assert by_model["omni"]["sets"]["ogg"]["utterances"] == 8
    assert by_model["omni"]["sets"]["ogg"]["wer"] <= expected + 0.25
    assert by_model["untrained"]["mean_wer"] > 0.5
    rows = list(csv.DictReader(open(out / "eval.csv")))
    assert len(rows) == 8
    # The shard dirs have no index.json: eval scanned them in memory and wrote none.
    assert not (shards / "index.json").exists() and not (ogg / "index.json").exists()
    assert "| `omni` vs `untrained` |" in printed and (out / "eval.md").read_text() in printed

    # analyze: analysis.json, 4 PNGs, random routing hurts the trained model
    out = tmp_path / "analysis"
    assert main(["analyze", str(trained), "--test-set", f"shards={shards}", "--out", str(out)]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["wer"] == pytest.approx(expected, abs=1e-12)
    assert analysis["random_routing"]["wer"] > analysis["wer"]
    L = 4
    agreement = np.array(analysis["agreement_nmi"])
    assert agreement.shape == (L, L) and np.allclose(agreement, agreement.T)
    assert np.allclose(np.diag(agreement), 1.0)
    assert np.allclose(np.array(analysis["usage"]).sum(axis=1), 1.0)
    assert len(analysis["rasters"]) == 4
    for png in ("usage.png", "entropy.png", "agreement.png", "rasters.png"):
        assert matplotlib.image.imread(out / png).shape[0] > 200


@pytest.mark.slow
@pytest.mark.distributed
def test_export_of_an_omni_ds_train_run_scores_like_its_dev_eval(tmp_path, capsys):
    """A run of ``omni-ds train`` (2 ranks, ep_size=2) exports with what the run dir holds (its
    config.yaml, the tokenizer named by data.tokenizer), and ``omni-ds eval`` of the export on
    the dev set agrees with the dev evaluation the live training engine logged."""
    from harness import run_command

    from data_pipeline.synth import generate
    from omni_ds.train.metrics import read_metrics

    corpus, run = tmp_path / "corpus", tmp_path / "run"
    generate(corpus, train_utterances=120, shard_size=60, vocab_size=64, workers=1, progress=False)
    options = [
        f"train.run_dir={run}", f"data.train=[{corpus}/train]", f"data.dev={{dev: {corpus}/dev}}",
        f"data.tokenizer={corpus}/tokenizer.model", "data.max_batch_seconds=30",
        "data.num_workers=0", "deepspeed=ds_configs/zero1_fp32.json", "model.vocab_size=64",
        "model.moe.ep_size=2", "train.max_steps=12", "train.progress_bar=false",
    ]  # fmt: skip
    argv = ["omni-ds", "train", "configs/tiny.yaml", *[a for o in options for a in ("--set", o)]]
    run_command(argv, 2, timeout=400)
    (dev,) = read_metrics(run, kind="dev/dev")

    model = tmp_path / "model"
    assert main(["export", str(run), "--out", str(model)]) == 0
    assert "exported step 12" in capsys.readouterr().out
    assert (model / "tokenizer.model").read_bytes() == (corpus / "tokenizer.model").read_bytes()
    out = tmp_path / "eval"
    assert main(["eval", str(model), "--test-set", f"dev={corpus / 'dev'}", "--out", str(out)]) == 0
    (scored,) = json.loads((out / "eval.json").read_text())["models"]
    assert scored["sets"]["dev"]["utterances"] == dev["utterances"]
    assert scored["sets"]["dev"]["wer"] == pytest.approx(dev["wer"], abs=1e-12)
