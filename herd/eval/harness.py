"""lm-evaluation-harness on herd's engine in process: an lm_eval LM whose loglikelihoods come from the engine's
batched prompt scoring and whose generations are the engine's decoding. Knows no HTTP and no task.

It computes what lm-eval's own `local-completions` client (lm_eval/models/openai_completions.py over api_models.py's
TemplateAPI, lm-eval 0.4.13) computes from a herd server's answers, so `herd eval lm` gives the same scores in
process and through `--server`. What that client sends and probes, read from its source:

- Tokenizer: with `tokenizer_backend=remote` (or `auto`, which picks remote when the probe below passes) it never
  loads a tokenizer from the hub. `check_remote_tokenizer_support` and `RemoteTokenizer` strip `/v1/completions`
  from base_url and call, on the server root: `GET /tokenizer_info` (a JSON object that must hold `eos_token`; also
  read: `bos_token`, `pad_token`, `chat_template`), `POST /tokenize` with `{"prompt": text, "add_special_tokens":
  false}` -> `{"tokens": [ids]}` and `POST /detokenize` with `{"tokens": [ids]}` -> `{"prompt": text}`. The eos /
  bos ids are `encode(eos_token)[0]` / `encode(bos_token)[0]`, so special-token text must encode to its id. The
  prefix token (the context of an empty-context request, the first of each rolling window) is `bos_token_id or
  eos_token_id`.
- Loglikelihood (`tokenized_requests=True`, the default): requests are sorted longest first and sent `batch_size`
  at a time as ONE request whose `prompt` is a list of token-id arrays (a list of strings, or one string at
  batch_size 1, only with `tokenized_requests=False`): `{"model", "prompt", "temperature": 0, "max_tokens": 1,
  "logprobs": 1, "seed": 1234, "echo": true}`. Each input is context + continuation, left-truncated to
  `max_length - 1` tokens (max_length defaults to 2048). From each choice (sorted by `index`, one per prompt) it
  reads `logprobs.token_logprobs[ctxlen:-1]` and `logprobs.top_logprobs[ctxlen:-1]`: the prompt tokens' logprobs
  (the first entry, for the first token, is null and never read), then the one generated token's, dropped by -1.
  The score is their sum; is_greedy is whether each token's logprob equals the largest value in its top_logprobs
  dict.
- Rolling loglikelihood (perplexity tasks): `utils.get_rolling_token_windows(tokens, prefix_token, max_length - 1,
  context_len=1)` made disjoint, each window scored as above.
- Generation: `{"prompt": [ids] per request, "max_tokens": max_gen_toks (256), "temperature": 0, "stop": until +
  the eos string, "seed": 1234}` (+ other gen_kwargs), reading `choices[i].text`.
- Concurrency: `num_concurrent` > 1 sends batches from asyncio tasks; otherwise one request at a time.
"""
from __future__ import annotations

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences
from tqdm import tqdm

from ..engine import Engine, SamplingParams
from ..textgen import complete_all
from ..tokenizer import Tokenizer


def score_prompts(engine: Engine, prompts: list[list[int]], top: int = 1, progress=None) -> list[list[dict | None]]:
    """Each prompt's per-token logprobs (engine Request.prompt_logprobs: None, then {"logprob", "top"}), scored
    through the engine's batched prefill: no more than max_batch prompts wait at a time, and they go in longest
    first so that a batch's rows have similar lengths (little padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))      # popped from the end: longest first
    params = SamplingParams(max_tokens=0, prompt_logprobs=top)
    out: list[list[dict | None] | None] = [None] * len(prompts)
    live = {}
    while order or live:
        while order and len(engine.waiting) < engine.max_batch:
            i = order.pop()
            live[i] = engine.add(prompts[i], params)
        engine.step()
        for i in [i for i, r in live.items() if r.finished]:
            out[i] = live.pop(i).prompt_logprobs
            if progress is not None:
                progress.update(1)
    return out


class HerdLM(TemplateLM):
    """lm_eval's LM over a herd model and tokenizer. batch_size: engine rows scored or decoded together;
    max_seq_len: the context; inputs are left-truncated to max_seq_len - 1 tokens, as local-completions does with
    its max_length."""

    def __init__(self, model, tok: Tokenizer, *, batch_size: int = 16, max_seq_len: int = 2048,
                 max_gen_toks: int = 256, seed: int = 1234):
        super().__init__()
        self.engine = Engine(model, max_batch=batch_size, max_seq_len=max_seq_len)
        self.tok, self.max_gen_toks, self.seed = tok, max_gen_toks, seed
        self.max_length = self.engine.max_seq_len - 1        # one slot kept for a generated token

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return "herd"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # the server's /tokenize: special-token text encodes to its id, no BOS added
        return self.tok.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        inputs, ctxlens = [], []
        for _, context, continuation in requests:
            whole = context + continuation
            inputs.append(whole[-self.max_length:])
            ctxlens.append(len(context) - max(0, len(whole) - self.max_length))
        with tqdm(total=len(inputs), desc="herd: scoring", disable=disable_tqdm) as bar:
            scored = score_prompts(self.engine, inputs, top=1, progress=bar)
        results = []
        for entries, ctxlen in zip(scored, ctxlens):
            continuation = entries[ctxlen:]
            results.append((sum(e["logprob"] for e in continuation),
                            all(e["logprob"] == e["top"][0][1] for e in continuation)))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length - 1,
                    context_len=1)):
                windows.append((None, context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[n] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless a task asks for sampling (do_sample), stopping at the task's `until` strings or eos;
        requests with the same generation settings run together."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        texts: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="herd: generating", disable=disable_tqdm) as bar:
            for members in groups.values():
                kwargs = dict(requests[members[0]].args[1])
                until = handle_stop_sequences(kwargs.pop("until", None), self.tok.eos_token or None)
                max_gen = int(kwargs.pop("max_gen_toks", kwargs.pop("max_tokens", self.max_gen_toks)))
                sample = kwargs.pop("do_sample", False)
                temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
                params = SamplingParams(max_tokens=max_gen, temperature=temperature, seed=self.seed,
                                        top_p=float(kwargs.pop("top_p", 1.0)),
                                        stop_token_ids=tuple(self.tok.eos_ids))
                keep = max(1, self.max_length - max_gen)
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in members]
                done = complete_all(self.engine, self.tok, prompts, params, until,
                                    on_done=lambda *_: bar.update(1))
                for i, text in zip(members, done):
                    texts[i] = text
        return texts
