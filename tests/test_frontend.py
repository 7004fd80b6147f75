"""omni_ds.frontend: log-mel against librosa, padding invariance, normalisation, SpecAugment."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import scipy.signal
import torch
from synth_speech import speech_like

from omni_ds.config.model import FrontendConfig, SpecAugmentConfig
from omni_ds.errors import ConfigError
from omni_ds.model.frontend import (
    LOG_FLOOR,
    Frontend,
    LogMel,
    mel_filterbank,
    normalize_utterance,
    num_frames,
    spec_augment,
)

# Stated tolerance: our fp32 log-mel is within 1e-3 (natural log, i.e. 0.1% in mel energy) of
# librosa's float64 one on every bin of every frame; measured: ~7e-5.
LOG_MEL_ATOL = 1e-3


def _batch(waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(w) for w in waves])
    audio = torch.zeros(len(waves), int(lens.max()))
    for i, w in enumerate(waves):
        audio[i, : len(w)] = torch.from_numpy(w)
    return audio, lens


def test_log_mel_matches_librosa_on_speech_like_audio():
    # librosa.feature.melspectrogram(y, sr=16000, n_fft=400, hop_length=160, window="hann",
    # center=False, power=2, n_mels=80), spelled out in float64: its filterbank, and the power
    # spectrum of whole periodic-Hann windows. (Calling it loads librosa.core, whose numba
    # kernels compile for ~30 s in every fresh venv; librosa.filters does not.)
    wave = speech_like(3.0, seed=1)
    frames = np.lib.stride_tricks.sliding_window_view(wave.astype(np.float64), 400)[::160]
    power = np.abs(np.fft.rfft(frames * scipy.signal.get_window("hann", 400), axis=1)) ** 2
    fbank = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80, dtype=np.float64)
    ref = np.log(power @ fbank.T + LOG_FLOOR)
    feats, lens = LogMel(80)(*_batch([wave]))
    assert feats.dtype == torch.float32 and int(lens[0]) == ref.shape[0] == 298
    assert ref.max() - ref.min() > 15  # the signal spans a speech-like dynamic range
    np.testing.assert_allclose(feats[0].numpy(), ref, atol=LOG_MEL_ATOL, rtol=0)
    np.testing.assert_allclose(
        mel_filterbank(80).numpy(), librosa.filters.mel(sr=16000, n_fft=400, n_mels=80), atol=1e-7
    )


def test_frame_counts_use_only_whole_windows():
    lens = torch.tensor([0, 399, 400, 559, 560, 16000])
    assert num_frames(lens).tolist() == [0, 0, 1, 1, 2, 98]


@pytest.mark.parametrize("subsampling", ["stack", "conv"])
def test_utterance_gives_the_same_frames_alone_and_padded(subsampling):
    torch.manual_seed(0)
    frontend = Frontend(FrontendConfig(subsampling=subsampling), d_model=32).eval()
    waves = [speech_like(s, seed=i) for i, s in enumerate([1.3, 0.45, 2.0])]
    batched, lens = frontend(*_batch(waves))
    for i, wave in enumerate(waves):
        alone, alone_len = frontend(*_batch([wave]))
        n = int(alone_len[0])
        assert int(lens[i]) == n == alone.shape[1]
        torch.testing.assert_close(batched[i, :n], alone[0], atol=1e-5, rtol=1e-5)
    expected = num_frames(lens.new_tensor([len(w) for w in waves]))
    if subsampling == "stack":
        assert lens.tolist() == (expected // 4).tolist()
    else:
        assert lens.tolist() == (((expected - 3) // 2 + 1 - 3) // 2 + 1).tolist()


def test_utterance_normalisation_uses_valid_frames_only():
    feats, lens = LogMel(80)(*_batch([speech_like(1.0, seed=3), speech_like(0.5, seed=4)]))
    norm = normalize_utterance(feats, lens)
    short = norm[1, : lens[1]]
    torch.testing.assert_close(short.mean(0), torch.zeros(80), atol=1e-4, rtol=0)
    torch.testing.assert_close(short.std(0, unbiased=False), torch.ones(80), atol=1e-3, rtol=0)
    assert norm[1, lens[1] :].abs().max() == 0


def test_spec_augment_masks_bands_and_spans_inside_the_utterance():
    torch.manual_seed(0)
    cfg = SpecAugmentConfig(freq_masks=2, freq_width=10, time_masks=3, time_width=20)
    feats = torch.randn(4, 200, 80) + 5.0  # no zeros before masking
    lens = torch.tensor([200, 150, 100, 60])
    out = spec_augment(feats, lens, cfg)
    masked = out == 0
    band = masked.all(dim=1)  # a masked mel bin is zero at every frame
    span = masked.all(dim=2)  # a masked frame is zero at every bin
    assert band.any(dim=1).all() and band.sum(dim=1).max() <= 20
    assert span.any(dim=1).all()
    for b, n in enumerate(lens.tolist()):
        assert not span[b, n:].any()
        assert span[b, :n].sum() <= 3 * min(20, int(0.05 * n))
    assert torch.equal(out[~masked], feats[~masked])


def test_spec_augment_only_in_training():
    frontend = Frontend(FrontendConfig(), d_model=16)
    audio, lens = _batch([speech_like(1.0, seed=5)])
    torch.manual_seed(0)
    train_a = frontend.train()(audio, lens)[0]
    torch.manual_seed(1)
    train_b = frontend(audio, lens)[0]
    eval_a = frontend.eval()(audio, lens)[0]
    assert not torch.equal(train_a, train_b)
    assert torch.equal(eval_a, frontend(audio, lens)[0])


def test_features_stay_fp32_in_a_bf16_model():
    frontend = Frontend(FrontendConfig(), d_model=16).eval()
    audio, lens = _batch([speech_like(1.0, seed=6)])
    ref = frontend.log_mel(audio, lens)[0]
    frontend.to(torch.bfloat16)
    feats = frontend.log_mel(audio, lens)[0]
    # the window and mel filters were not rounded to bf16 with the model
    assert feats.dtype == torch.float32 and torch.equal(feats, ref)
    assert frontend(audio, lens)[0].dtype == torch.bfloat16


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="specaug.time_width_ratio"):
        SpecAugmentConfig(time_width_ratio=2.0)
    with pytest.raises(ConfigError, match="frontend.n_mels"):
        FrontendConfig(n_mels=0)
