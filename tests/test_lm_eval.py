"""The lm-evaluation-harness adapter (the ``lm-eval`` extra; skipped where it is not installed): a local
two-item multiple-choice task run offline through ``python -m jobs.lm_eval`` gives the same per-choice
log-likelihoods as ``aquila_ray.eval``; rolling log-likelihood and greedy generation match direct
computations on the model; lm-eval's own ``hf`` model scores the ``to-hf`` export alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from aquila_ray.checkpoint import load_model, save_model  # noqa: E402
from aquila_ray.config import get_preset  # noqa: E402
from aquila_ray.errors import CheckpointError, ConfigError  # noqa: E402
from aquila_ray.eval import choice_scores  # noqa: E402
from aquila_ray.eval.harness import AquilaLM, evaluate_harness  # noqa: E402
from aquila_ray.hf.tokenizer import hf_tokenizer  # noqa: E402
from aquila_ray.model import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "天下大势分久必合", "the sun is hot today"] * 4
ITEMS = [{"question": "the cat", "choices": ["sat on the mat", "ran in the park"], "answer": 0},
         {"question": "天下", "choices": ["大势", "the sun is hot", "hot"], "answer": 0}]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model checkpoint carrying a byte-level BPE tokenizer.json + tokenizer_config.json, as the
    trainer writes them."""
    path = tmp_path_factory.mktemp("lm_eval") / "ckpt"
    save_model(build_model(get_preset("tiny"), seed=0), path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tokenizer(tok.to_str().encode(), model_max_length=128).write(path)
    return path


@pytest.fixture(scope="module")
def lm(ckpt: Path) -> AquilaLM:
    return AquilaLM(ckpt, batch_size=3)


def test_local_multiple_choice_matches_aquila_ray_eval(ckpt: Path, tmp_path: Path) -> None:
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ITEMS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "hf-cache"))
    out = tmp_path / "results.json"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "jobs.lm_eval", str(ckpt), "--tasks", "tiny_mc", "--include-path",
                           str(tasks), "--only-include-path", "--batch-size", "2", "--log-samples", "--output",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["results"]["tiny_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    samples = results["samples"]["tiny_mc"]
    assert sorted(s["doc_id"] for s in samples) == [0, 1]

    model = load_model(ckpt)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    for s in samples:
        item = ITEMS[s["doc_id"]]
        context = item["question"]
        conts = [" " + c for c in item["choices"]]
        assert [tuple(a) for a in s["arguments"]] == [(context, c) for c in conts]  # the requests lm-eval made
        prompt = tok.encode(context).ids
        choice_ids = [tok.encode(c).ids for c in conts]
        # like with like: the adapter encodes context + continuation together and splits (lm-eval's causal
        # convention), aquila_ray.eval encodes them apart; for these items the two are the same tokens
        assert all(prompt + c == tok.encode(context + t).ids for c, t in zip(choice_ids, conts, strict=True))
        mean_nll = choice_scores(model, prompt, choice_ids, max_len=128)
        expected = [-m * len(c) for m, c in zip(mean_nll, choice_ids, strict=True)]
        got = [float(r[0]) for r in s["filtered_resps"]]
        assert len(got) == len(expected)
        assert max(abs(g - e) for g, e in zip(got, expected, strict=True)) < 1e-5, (got, expected)
        pred = max(range(len(got)), key=got.__getitem__)
        assert s["acc"] == float(pred == item["answer"])


def _direct_rolling(model: torch.nn.Module, tokens: list[int], eos: int, window: int) -> float:
    """Each chunk of ``window`` tokens, scored from the ``window`` positions of [EOS] + tokens that end just
    before the chunk's last token (lm-eval's rolling windows, written out)."""
    full = [eos] + tokens
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens), window):
            end = min(start + window, len(tokens))
            lo = max(0, end - window)
            logp = torch.log_softmax(model(torch.tensor([full[lo:end]])).logits[0].float(), -1)
            for j in range(start, end):  # token j sits at full[j + 1], predicted from position j - lo
                total += float(logp[j - lo, full[j + 1]])
    return total


def test_loglikelihood_rolling_matches_direct_computation(ckpt: Path, lm: AquilaLM) -> None:
    text = "the cat sat on the mat. a dog ran in the park, 天下大势分久必合; the sun is hot today."
    tokens = lm.tok_encode(text)
    model = load_model(ckpt)
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([text, "the cat"])]
    whole = lm.loglikelihood_rolling(requests)
    assert abs(whole[0] - _direct_rolling(model, tokens, lm.eot_token_id, 128)) < 1e-4
    assert abs(whole[1] - _direct_rolling(model, lm.tok_encode("the cat"), lm.eot_token_id, 128)) < 1e-5
    short = AquilaLM(ckpt, batch_size=2, max_length=8)  # several windows, the last one overlapping
    assert len(tokens) > 20 and len(tokens) % 8 != 0
    (windowed,) = short.loglikelihood_rolling(requests[:1])
    assert abs(windowed - _direct_rolling(model, tokens, lm.eot_token_id, 8)) < 1e-4
    assert abs(windowed - whole[0]) > 1e-3  # the windows did cut the context


def test_generate_until_is_greedy_and_stops_on_until(ckpt: Path, lm: AquilaLM, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    model = load_model(ckpt)
    contexts = ["the cat sat on", "a dog"]
    expected = []
    with torch.no_grad():
        for c in contexts:
            ids = lm.tok_encode(c)
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(lm.tok_decode(ids[len(lm.tok_encode(c)):]))
    free = lm.generate_until([Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 12}), i)
                              for i, c in enumerate(contexts)])
    assert free == expected  # two lengths in one right-padded batch, each greedy
    text = free[0]
    assert len(text) >= 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    calls = []
    forward = lm._log_probs

    def counted(rows: list[list[int]]) -> torch.Tensor:
        calls.append(len(rows))
        return forward(rows)

    monkeypatch.setattr(lm, "_log_probs", counted)
    (stopped,) = lm.generate_until([Instance("generate_until", {}, (contexts[0], {"until": [stop],
                                                                                 "max_gen_toks": 12}), 0)])
    assert stopped == text.split(stop)[0] and len(stopped) < len(text)
    assert len(calls) < 12  # generation stopped at the stop string, not at max_gen_toks


def test_clear_errors(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*nope does not exist"):
        AquilaLM(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        evaluate_harness(ckpt, ["no_such_task"], include_path=tmp_path, include_defaults=False)
    from jobs.lm_eval import main

    with pytest.raises(CheckpointError, match=r"checkpoint directory .*missing does not exist"):
        main([str(tmp_path / "missing"), "--tasks", "arc_easy"])


def test_scores_like_lm_evals_hf_model_on_the_to_hf_export(ckpt: Path, lm: AquilaLM, tmp_path: Path) -> None:
    """Same conventions as lm-eval's own ``hf`` model (encoding, empty context, rolling windows): the
    checkpoint and its ``jobs.convert_hf to-hf`` export score alike."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    from jobs.convert_hf import main as convert

    convert(["to-hf", str(ckpt), str(tmp_path / "hf")])
    hf = HFLM(pretrained=str(tmp_path / "hf"), batch_size=2, device="cpu", dtype="float32")
    pairs = [("the cat", " sat on the mat"), ("a dog ", "ran"), ("天下", " 大势"), ("", "the sun")]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    ours, theirs = lm.loglikelihood(requests), hf.loglikelihood(requests)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert max(abs(a - b) for (a, _), (b, _) in zip(ours, theirs, strict=True)) < 1e-4
    rolling = [Instance("loglikelihood_rolling", {}, ("the cat sat on the mat. 天下大势分久必合",), 0)]
    assert abs(lm.loglikelihood_rolling(rolling)[0] - hf.loglikelihood_rolling(rolling)[0]) < 1e-4
