"""Evaluation: loss on shards equals the model's own loss; perplexity-based choice picks the likeliest."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from aquila_ray.checkpoint import save_model
from aquila_ray.config import get_preset
from aquila_ray.data.shards import Manifest, ShardInfo, SplitInfo, write_manifest, write_token_shard
from aquila_ray.errors import DataError
from aquila_ray.eval import choice_scores, evaluate_checkpoint, evaluate_loss, multiple_choice, read_tasks
from aquila_ray.model import build_model


def _data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 512, size=(10, 17))
    write_token_shard(tmp_path / "tokens/validation/v-00000.arrow", rows[:6])
    write_token_shard(tmp_path / "tokens/validation/v-00001.arrow", rows[6:])
    split = SplitInfo([ShardInfo("tokens/validation/v-00000.arrow", 6),
                       ShardInfo("tokens/validation/v-00001.arrow", 4)])
    write_manifest(tmp_path, Manifest(seq_len=16, vocab_size=512, tokenizer_sha256="x",
                                      splits={"train": SplitInfo(), "validation": split}))
    return tmp_path


def test_loss_matches_direct_computation(tmp_path: Path) -> None:
    data = _data(tmp_path)
    model = build_model(get_preset("tiny"), seed=0).eval()
    res = evaluate_loss(model, data, batch_size=4)
    from aquila_ray.data.shards import read_token_shard

    allrows = torch.from_numpy(np.concatenate([read_token_shard(p) for p in sorted(data.glob("tokens/validation/*"))])
                               .astype(np.int64))
    with torch.no_grad():
        direct = model(allrows[:, :-1], labels=allrows[:, 1:]).loss.item()
    assert res["sequences"] == 10 and res["tokens"] == 160
    assert abs(res["loss"] - direct) < 1e-5 and abs(res["perplexity"] - math.exp(direct)) < 1e-3
    with pytest.raises(DataError, match=r"split 'train' has no sequences"):
        evaluate_loss(model, data, split="train")


def test_choice_scores_are_mean_choice_nll() -> None:
    model = build_model(get_preset("tiny"), seed=0).eval()
    prompt, choices = [1, 2, 3], [[4, 5], [6], [7, 8, 9]]
    scores = choice_scores(model, prompt, choices, max_len=128)
    with torch.no_grad():
        for c, s in zip(choices, scores, strict=True):
            ids = torch.tensor([prompt + c])
            logp = torch.log_softmax(model(ids).logits[0], -1)
            nll = -torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(c)]).mean()
            assert abs(nll.item() - s) < 1e-5


def test_multiple_choice_end_to_end(tmp_path: Path) -> None:
    texts = ["the cat sat on the mat", "a dog ran in the park", "天下大势分久必合", "the sun is hot today"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"question": "the cat", "choices": [" sat on the mat", " ran in"], "answer": 0}\n'
                     '{"question": "天下", "choices": ["大势", "the sun", "hot"], "answer": 1}\n')
    items = read_tasks(tasks)
    model = build_model(get_preset("tiny"), seed=0).eval()
    res = multiple_choice(model, tok, items)
    expected = sum(
        int(np.argmin(choice_scores(model, tok.encode(t["question"]).ids, [tok.encode(c).ids for c in t["choices"]],
                                    128)) == t["answer"]) for t in items)
    assert res["correct"] == expected and res["items"] == 2 and abs(res["chance"] - (1 / 2 + 1 / 3) / 2) < 1e-12
    save_model(model, tmp_path / "ck")
    data = _data(tmp_path / "data")
    (data / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    out = evaluate_checkpoint(tmp_path / "ck", data_dir=data, tasks=tasks)
    assert out["multiple_choice"]["correct"] == expected and out["validation"]["sequences"] == 10


def test_bad_task_file(tmp_path: Path) -> None:
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(DataError, match=r"t.jsonl:1: expected \{'question': str, 'choices': \[>= 2 str\]"):
        read_tasks(bad)
    bad.write_text("{oops\n")
    with pytest.raises(DataError, match=r"t.jsonl:1: not valid JSON"):
        read_tasks(bad)


@pytest.mark.parametrize("job, args", [("evaluate", ["--ckpt", "c"]), ("convert_hf", ["to-hf", "c", "h"])])
def test_jobs_without_a_config_refuse_config_flags(job: str, args: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """evaluate and convert_hf have no config: --config / --set are refused, not silently ignored."""
    import importlib

    main = importlib.import_module(f"jobs.{job}").main
    for flag in (["--config", "x.yaml"], ["--set", "a=1"]):
        with pytest.raises(SystemExit) as e:
            main(args + flag)
        assert e.value.code == 2 and f"unrecognized arguments: {flag[0]}" in capsys.readouterr().err
