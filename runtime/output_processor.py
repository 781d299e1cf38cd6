"""Turns each sequence's new tokens into text deltas and decides when it is finished.

Stop strings are matched on the decoded text, across token boundaries; text that might be the
start of a stop string is held back until it is known not to be one, so a stop string is never
emitted, not even in part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmc.runtime.sampling_params import TokenLogprob
from llmc.runtime.sequence import Sequence
from llmc.runtime.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]  # new tokens since the previous output
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # With the first output of a request that asked for them: one per prompt token (None first).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None


@dataclass
class _TextState:
    detok: IncrementalDetokenizer
    text: str = ""  # everything decoded so far
    emitted: int = 0  # characters of `text` already sent
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._states: dict[int, _TextState] = {}

    def start(self, seq: Sequence) -> None:
        self._states[seq.seq_id] = _TextState(IncrementalDetokenizer(self.tokenizer, seq.prompt_ids))

    def discard(self, seq: Sequence) -> None:
        self._states.pop(seq.seq_id, None)

    def on_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        """Record `token` (already appended to seq.output_ids) and return what to send."""
        state = self._states[seq.seq_id]
        state.pending_ids.append(token)
        if logprob is not None:
            state.pending_logprobs.append(logprob)
        params = seq.params
        reason: str | None = None
        is_stop_token = (token in self.tokenizer.eos_ids and not params.ignore_eos) or token in params.stop_token_ids
        if is_stop_token:
            reason = "stop"
        else:
            state.text += state.detok.push(token)
            for stop in params.stop:
                at = state.text.find(stop, max(0, state.emitted - len(stop) + 1))
                if at != -1:
                    state.text = state.text[:at]
                    reason = "stop"
                    break
        if reason is None and seq.constraint is not None and seq.constraint.finished:
            reason = "stop"  # the grammar is complete: nothing more may follow
        if reason is None and (len(seq.output_ids) >= params.max_tokens or len(seq) >= self.max_model_len):
            reason = "length"
        if reason is None:
            # Hold back the longest tail that is a proper prefix of some stop string.
            hold = max((_overlap(state.text, s) for s in params.stop), default=0)
            end = len(state.text) - hold
        else:
            end = len(state.text)
        delta = state.text[state.emitted : end] if end > state.emitted else ""
        state.emitted = max(state.emitted, end)
        ids, state.pending_ids = state.pending_ids, []
        logprobs, state.pending_logprobs = state.pending_logprobs, []
        out = RequestOutput(
            request_id=seq.request_id,
            text=delta,
            token_ids=ids,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            cached_tokens=seq.num_cached,
            logprobs=logprobs,
            prompt_logprobs=seq.prompt_logprobs
            if len(seq.output_ids) == 1 and seq.params.prompt_logprobs is not None
            else None,
        )
        if reason is not None:
            seq.finish_reason = reason
            self.discard(seq)
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
