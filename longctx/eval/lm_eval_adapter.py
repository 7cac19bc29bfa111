"""lm-evaluation-harness adapter: the `longctx` model type, so any harness task runs on a trained run.

    pip install 'longctx[eval]'        # lm-eval
    longctx eval lm-eval --make-tasks tasks/        # local tasks made from the built-in corpus
    longctx eval lm-eval -- --model longctx --model_args run=runs/demo-continue --batch_size 4 \
        --tasks longctx_corpus_mc,longctx_corpus_ppl,longctx_passkey --include_path tasks/

`longctx eval lm-eval -- ARGS` imports this module (which registers `longctx` in lm-eval's model
registry) and runs lm-eval's own command line on ARGS. From Python, `import longctx.eval.lm_eval_adapter`
does the same for `lm_eval.simple_evaluate(model="longctx", model_args="run=...")`.

Model arguments: `run` (the run directory), `checkpoint` (default: the run's own weights),
`max_length` (tokens of context, default the run's `data.seq_len`), `max_gen_toks` (default 256);
lm_eval's `--batch_size` (default 1) applies. The model runs on CUDA when there is one, else on the
CPU (lm_eval's `--device` is not followed). Log-likelihoods come from one forward pass per batch
(right-padded, which a causal model never sees), only the continuation's positions projected to the
vocabulary; `generate_until` decodes greedily with the per-mixer caches of `longctx.generation`.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the lm-evaluation-harness adapter needs lm-eval: pip install 'longctx[eval]' (or lm-eval)"
    ) from e

from longctx.model.decoding import ModelCache, decode_step, prefill
from longctx.weights import load_model_for_eval


@torch.no_grad()
def continuation_logprobs(model, tokens: list[list[int]], n_scored: list[int]) -> list[tuple[float, bool]]:
    """For each token list, the summed log-probability of its last `n` tokens given the ones before
    them, and whether each of those tokens is the argmax. One right-padded forward for the batch."""
    device = next(model.parameters()).device
    width = max(len(t) for t in tokens) - 1
    batch = torch.zeros(len(tokens), width, dtype=torch.long, device=device)
    for i, t in enumerate(tokens):
        batch[i, : len(t) - 1] = torch.tensor(t[:-1], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = model(batch, return_hidden=True)  # [B, T, dim]
    out = []
    for i, (t, n) in enumerate(zip(tokens, n_scored)):
        positions = torch.arange(len(t) - 1 - n, len(t) - 1, device=device)
        logits = model.output(hidden[i, positions]).float()  # [n, vocab]
        target = torch.tensor(t[-n:], device=device)
        logp = F.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
        out.append((float(logp.sum()), bool((logits.argmax(-1) == target).all())))
    return out


@register_model("longctx")
class LongctxLM(TemplateLM):
    """A longctx run as an lm-eval model (module docstring)."""

    def __init__(
        self,
        run: str,
        checkpoint: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
        max_batch_size: int | None = None,
        **unused,
    ):
        super().__init__()
        if unused:
            raise ValueError(
                f"unknown longctx model_args {sorted(unused)}; use run, checkpoint, max_length, max_gen_toks "
                "(and lm_eval's own --batch_size, --device)"
            )
        # The model goes where every longctx evaluation puts it (CUDA when there is one); lm_eval's
        # --device (default cuda) is not followed.
        self.model, self.cfg, self.tokenizer = load_model_for_eval(run, checkpoint)
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or self.cfg.data.seq_len)
        self.max_gen_toks = int(max_gen_toks)
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """`(context, continuation)` token pairs, scored in batches of similar length (longest first),
        each cut from the left to `max_length + 1` tokens."""
        windows = []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("an lm-eval request has an empty continuation; nothing to score")
            whole = (context + continuation)[-(self.max_length + 1) :]
            windows.append((whole, min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results: list = [None] * len(windows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            scored = continuation_logprobs(
                self.model, [windows[i][0] for i in chunk], [windows[i][1] for i in chunk]
            )
            for i, r in zip(chunk, scored):
                results[i] = r
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok_encode(text), self.eot_token_id, self.max_length, context_len=1
                )
            ]
            total = sum(logp for logp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list = [None] * len(requests)
        # Contexts of one token length (and the same settings) decode together.
        groups: dict = {}
        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError(
                    "the longctx lm-eval adapter decodes greedily; set do_sample=false, temperature=0"
                )
            # An empty context starts from the end-of-text token, as lm-eval's log-likelihoods do.
            ids = (self.tok_encode(context) or [self.eot_token_id])[-max(self.max_length - max_new, 1) :]
            groups.setdefault((len(ids), max_new, tuple(until)), []).append((i, ids))
        for (_, max_new, until), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                texts = self._greedy_until([ids for _, ids in chunk], max_new, list(until))
                for (i, _), text in zip(chunk, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    @torch.no_grad()
    def _greedy_until(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[str]:
        """Greedy continuations of equal-length `prompts`, each cut before its first stop string; stops
        once every row has ended (a stop string or the end-of-text token)."""
        model, device = self.model, self.device
        cache = ModelCache.empty(model, len(prompts))
        tokens = torch.tensor(prompts, device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        with autocast:
            logits = prefill(model, tokens, cache)
        new = [[] for _ in prompts]
        ended = [False] * len(prompts)
        for step in range(max_new):
            nxt = logits.argmax(-1)
            for row, t in enumerate(nxt.tolist()):
                if ended[row]:
                    continue
                if t == self.eot_token_id:
                    ended[row] = True
                    continue
                new[row].append(t)
                ended[row] = any(s in self.tok_decode(new[row]) for s in until)
            if all(ended) or step + 1 == max_new:
                break
            with autocast:
                logits = decode_step(model, nxt, cache)
        texts = []
        for ids in new:
            text = self.tok_decode(ids)
            for s in until:
                text = text.split(s)[0]
            texts.append(text)
        return texts


TASKS_YAML = {
    "longctx_corpus_mc": """task: longctx_corpus_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "longctx_corpus_ppl": """task: longctx_corpus_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "longctx_passkey": """task: longctx_passkey
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
  temperature: 0.0
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
""",
}


def make_tasks(out_dir: str | Path, samples: int = 20, seed: int = 0) -> list[str]:
    """Write three local lm-eval tasks made from the built-in corpus into `out_dir` (a YAML and a JSON
    lines file each); returns their names. Use them with `--include_path out_dir`.

    - `longctx_corpus_mc` (multiple choice, loglikelihood): which of four passages continues a text.
    - `longctx_corpus_ppl` (loglikelihood_rolling): word/byte perplexity of corpus passages.
    - `longctx_passkey` (generate_until): the passkey sentence and question, the key generated.
    """
    from longctx.data import builtin_documents
    from longctx.data.passkey import NEEDLE, QUESTION

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = [d for d in builtin_documents() if len(d) > 2000]
    passages = []
    for _ in range(samples * 4):
        doc = docs[int(rng.integers(len(docs)))]
        at = int(rng.integers(0, len(doc) - 800))
        passages.append(doc[at : at + 600])
    rows = {"longctx_corpus_mc": [], "longctx_corpus_ppl": [], "longctx_passkey": []}
    for i in range(samples):
        text = passages[4 * i]
        cut = text.rfind(" ", 0, 400)
        choices = [text[cut:]] + [p[: len(text) - cut] for p in passages[4 * i + 1 : 4 * i + 4]]
        label = int(rng.integers(4))
        choices[0], choices[label] = choices[label], choices[0]
        rows["longctx_corpus_mc"].append({"context": text[:cut], "choices": choices, "label": label})
        rows["longctx_corpus_ppl"].append({"text": passages[4 * i + 1]})
        key = str(int(rng.integers(100, 1000)))
        filler = passages[4 * i + 2][:300]
        prompt = f"{filler} {NEEDLE.format(key=key)} {passages[4 * i + 3][:300]} {QUESTION.format(key='')}"
        rows["longctx_passkey"].append({"prompt": prompt.rstrip(), "answer": key})
    for name, data in rows.items():
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        (out / f"{name}.yaml").write_text(TASKS_YAML[name].format(data=path.resolve()))
    return list(rows)


def run_lm_eval(args: list[str]) -> int:
    """lm-eval's command line on `args`, with the `longctx` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
    return 0
