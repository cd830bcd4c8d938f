"""An aquila-ray checkpoint as an lm-evaluation-harness model (``lm_eval``, the ``lm-eval`` extra).

``AquilaLM`` is registered as ``"aquila-ray"`` and implements the three request types of ``lm_eval``'s
``LM``: ``loglikelihood`` (what the perplexity-style multiple-choice tables of the AquilaMoE card use: ARC,
HellaSwag, MMLU, C-Eval, CMMLU), ``loglikelihood_rolling`` (perplexity of whole documents) and
``generate_until`` (greedy). ``jobs.lm_eval`` is the command; this module is imported only there and by
users of the extra, since it imports ``lm_eval`` at the top.

It follows lm-eval's own ``hf`` model (HFLM) wherever the two could differ, so an aquila-ray checkpoint and
its ``jobs.convert_hf to-hf`` export score alike:

- context/continuation: trailing whitespace of the context moves onto the continuation, the pair is encoded
  *together* and split at the context's token count (``TemplateLM._encode_pair``, the causal-LM convention);
  an empty context is the EOS token (``prefix_token_id``);
- a (context + continuation) longer than ``max_length + 1`` tokens is truncated from the left and the model
  reads the first ``max_length`` of what is left; the result is the summed log-probability of the
  continuation tokens and whether greedy decoding would have produced them all;
- rolling log-likelihood: ``get_rolling_token_windows`` / ``make_disjoint_window`` with the EOS token as
  the first window's prefix, windows of ``max_length`` tokens;
- requests are sorted by length (longest first) and batched, right-padded: the model is causal, so padding
  after a sequence changes none of its logits. A capacity-limited MoE (``moe.capacity_factor`` set) is the
  exception: its experts' capacity counts the padding too, so exact numbers need ``batch_size=1`` there
  (dropless MoE, the default, is unaffected).

``generate_until`` is greedy only and recomputes the whole sequence for each new token (no KV cache):
adequate at the sizes this repository evaluates on one device, and it keeps the adapter to the model's one
forward.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lm_eval
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer

from aquila_ray.checkpoint import load_model
from aquila_ray.errors import CheckpointError, ConfigError, DataError

logger = logging.getLogger(__name__)

TOKENIZER_NAME, TOKENIZER_CONFIG_NAME, EOS_TOKEN = "tokenizer.json", "tokenizer_config.json", "<|endoftext|>"
"""The files the trainer writes into every checkpoint and the data job's EOS token (``aquila_ray.hf.tokenizer``
names the same; not imported from there to keep ``aquila_ray.hf``'s conversion code out of this import)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (request key or None, context token ids, continuation token ids): TemplateLM's tokenized request
TokenRequest = tuple[Any, list[int], list[int]]


def _eos_id(tokenizer: Tokenizer, tokenizer_path: Path, eos_token: str | None) -> int:
    """EOS: ``eos_token``, else ``tokenizer_config.json``'s ``eos_token`` beside the tokenizer, else
    ``<|endoftext|>``; DataError naming the file when the vocabulary has none of them."""
    config = tokenizer_path.parent / TOKENIZER_CONFIG_NAME
    if eos_token is None and config.is_file():
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        eos_token = eos.get("content") if isinstance(eos, dict) else eos
    name = eos_token or EOS_TOKEN
    eos_id = tokenizer.token_to_id(name)
    if eos_id is None:
        raise DataError(f"{tokenizer_path} has no EOS token {name!r} (lm-eval needs one: the prefix of an empty "
                        "context and of rolling windows, and a stop for generation); pass eos_token=...")
    return int(eos_id)


@register_model("aquila-ray")
class AquilaLM(TemplateLM):
    """An aquila-ray checkpoint (dense or MoE) as an ``lm_eval`` model.

    ``pretrained``: the checkpoint directory (``aquila_ray.checkpoint.load_model``); ``tokenizer``: a
    ``tokenizers`` ``tokenizer.json`` (default: the one inside the checkpoint, which the trainer writes);
    ``max_length``: the context window in tokens (default: the model's ``max_seq_len``); ``max_gen_toks``:
    the default generation budget of ``generate_until``. lm-eval's CLI form:
    ``--model aquila-ray --model_args pretrained=CKPT,batch_size=8`` (after importing this module).
    """

    def __init__(self, pretrained: str | Path, tokenizer: str | Path | None = None, batch_size: int | str = 8,
                 device: str = "cpu", max_length: int | None = None, max_gen_toks: int = 256,
                 dtype: str = "float32", eos_token: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:  # lm-eval's CLI adds max_batch_size and the like; none of them apply here
            logger.info("aquila-ray lm-eval model: ignoring %s", sorted(kwargs))
        ckpt = Path(pretrained)
        if not ckpt.is_dir():
            raise CheckpointError(f"checkpoint directory {ckpt} does not exist")
        tok_path = Path(tokenizer) if tokenizer is not None else ckpt / TOKENIZER_NAME
        if not tok_path.is_file():
            raise DataError(f"tokenizer {tok_path} does not exist" + (
                "" if tokenizer is not None else
                " (this checkpoint carries no tokenizer: pass tokenizer=DATA_DIR/tokenizer.json)"))
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r} "
                              "('auto' is not supported)") from None
        if self.batch_size < 1 or max_gen_toks < 1:
            raise ConfigError(f"batch_size ({batch_size}) and max_gen_toks ({max_gen_toks}) must be >= 1")
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        self._device = torch.device(device)
        self.model = load_model(ckpt, device=self._device, dtype=_DTYPES[dtype])
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        self.tokenizer_path = tok_path
        self._eot = _eos_id(self.tokenizer, tok_path, eos_token)
        self.max_length = int(max_length or self.model.config.max_seq_len)  # type: ignore[union-attr,arg-type]
        self.max_gen_toks = int(max_gen_toks)
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 tokens, got {self.max_length}")

    # --- tokenization (TemplateLM's interface) ---

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer_path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's ids; its default post-processing unless told (the data job's tokenizer has none,
        so this is also what ``aquila_ray.eval`` and the training data see)."""
        return list(self.tokenizer.encode(string, add_special_tokens=True if add_special_tokens is None
                                          else add_special_tokens).ids)

    def tok_decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    # --- scoring ---

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """fp32 log-softmax of the model's logits for right-padded ``rows``: (B, T, V)."""
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        logits = self.model(batch.to(self._device)).logits
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether it is the greedy continuation) per request, in
        request order; computed longest first, ``batch_size`` at a time."""
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows, spans = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                if not context or not continuation or len(continuation) > self.max_length:
                    raise DataError(f"request {requests[i][0]!r}: empty context or continuation, or a "
                                    f"continuation longer than max_length={self.max_length} tokens")
                full = context + continuation
                if len(full) > self.max_length + 1:
                    logger.warning("context (%d) + continuation (%d) tokens exceed max_length %d: truncating "
                                   "%d from the left", len(context), len(continuation), self.max_length,
                                   len(full) - self.max_length - 1)
                rows.append(full[-(self.max_length + 1):][:-1])
                spans.append(continuation)
            logp = self._log_probs(rows)
            for i, row, continuation, lp in zip(chunk, rows, spans, logp, strict=True):
                n = len(continuation)
                lp = lp[len(row) - n: len(row)]  # the positions that predict the continuation
                target = torch.tensor(continuation, dtype=torch.long, device=lp.device)
                greedy = bool((lp.argmax(dim=-1) == target).all())
                answer = (float(lp.gather(1, target[:, None]).sum()), greedy)
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string: disjoint windows of ``max_length`` tokens, the first one
        conditioned on EOS, each later one on as much preceding text as fits (HFLM's windows)."""
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for k, req in enumerate(requests):
            (string,) = req.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[k] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until one of its ``until`` strings (or EOS) appears or
        ``max_gen_toks`` tokens; the text before the stop string. Sampling is refused."""
        eos = self.tokenizer.id_to_token(self._eot)
        prepared = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ConfigError(f"the aquila-ray lm-eval model decodes greedily only; got {dict(gen_kwargs)}")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            budget = min(int(kwargs["max_gen_toks"]), self.max_length - 1)
            ids = self.tok_encode(context)[-(self.max_length - budget):] or [self._eot]
            prepared.append((ids, until, budget))
        order = sorted(range(len(requests)), key=lambda i: -len(prepared[i][0]))
        out = [""] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows = [list(prepared[i][0]) for i in chunk]
            new: list[list[int]] = [[] for _ in chunk]
            live = list(range(len(chunk)))
            while live:
                logp = self._log_probs([rows[j] for j in live])
                still = []
                for b, j in enumerate(live):
                    token = int(logp[b, len(rows[j]) - 1].argmax())
                    rows[j].append(token)
                    new[j].append(token)
                    _, until, budget = prepared[chunk[j]]
                    text = self.tok_decode(new[j])
                    if token != self._eot and len(new[j]) < budget and not any(s and s in text for s in until):
                        still.append(j)
                live = still
            for j, i in enumerate(chunk):
                text = postprocess_generated_text(self.tok_decode(new[j]), stop=prepared[i][1], think_end_token=None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def evaluate_harness(checkpoint: str | Path, tasks: list[str], include_path: str | Path | None = None,
                     include_defaults: bool = True, num_fewshot: int | None = None, limit: int | float | None = None,
                     batch_size: int = 8, device: str = "cpu", tokenizer: str | Path | None = None,
                     log_samples: bool = False, **model_kwargs: Any) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of a checkpoint on ``tasks``: lm-eval's results dict (``results``,
    ``configs``, ``n-shot``, ...; ``samples`` too with ``log_samples``). ``include_path`` adds a folder of
    task YAMLs; ``include_defaults=False`` reads only that folder (lm-eval's ~15k built-in tasks take
    seconds to index). Unknown task names are a ConfigError naming them."""
    if not tasks:
        raise ConfigError("no tasks given (e.g. --tasks arc_easy,hellaswag)")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"task include path {include_path} is not a directory")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None,
                          include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"lm-eval's tasks{f' or {include_path}' if include_path else ''}" if include_defaults \
            else str(include_path)
        raise ConfigError(f"unknown lm-eval task(s) {unknown}: not in {where} (lm-eval's task names are the "
                          "folders/YAMLs under lm_eval/tasks, e.g. arc_easy, hellaswag, mmlu, ceval-valid, cmmlu)")
    model = AquilaLM(checkpoint, tokenizer=tokenizer, batch_size=batch_size, device=device, **model_kwargs)
    results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples)
    if results is None:  # only on ranks other than 0, which a single-process run never is
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return dict(results)


__all__ = ["AquilaLM", "evaluate_harness"]
