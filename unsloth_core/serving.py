"""Continuous batching: many concurrent requests share one decode loop over one model.

A background thread owns the model and its KV cache. Each step it admits waiting requests (prefilling each into a
free cache row), then runs one decode step for every live row at once, so N streams cost about one weight read per
token instead of N. Rows finish independently; a finished row's slot is refilled by moving the last live row into
it, which keeps the live rows contiguous (rows [0, B) of the cache) so each step attends over a plain slice.

Each sequence starts at slot 0 of its own row (no padding), so its slots are its positions.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from unsloth_core.adapters import BASE, AdapterPool
from unsloth_core.constrained import RowConstraint, apply_masks
from unsloth_core.errors import CapacityError, EngineClosedError
from unsloth_core.memory import release_memory
from unsloth_core.merged import merged_projections
from unsloth_core.model import KVCache, Llama
from unsloth_core.request_state import (
    Delta,
    Prompt,
    RowState,
    TokenLogprob,
    check_context,
    encode_prompt,
    prompt_token_logprobs,
    step_logprobs,
    token_logprob,
)
from unsloth_core.sampling import Sampler, SamplingParams
from unsloth_core.static_step import StaticStep
from unsloth_core.tokenizer import Tokenizer


class Stream:
    """The output of one or more requests (the `n` choices of one API call share a Stream).

    Iterate for `Delta`s (each request's last one has its finish reason), or `batches()` for lists of whatever is
    ready; `cancel()` stops every request of the stream at the next step.
    """

    def __init__(self, n_requests: int = 1, on_item: Callable[[Delta | BaseException | None], None] | None = None
                 ) -> None:
        self._queue: queue.Queue[Delta | BaseException | None] = queue.Queue()
        self._open = n_requests  # requests still running; each posts None when it ends
        self._pending: collections.deque[Delta] = collections.deque()
        self.cancelled = threading.Event()
        # Push mode: the engine's thread hands each item (a Delta, an error, or None when a request ends) to this
        # callback instead of the queue, so a consumer on an event loop needs no thread of its own to wait on it.
        # It must be quick and thread-safe (`loop.call_soon_threadsafe`).
        self._on_item = on_item

    def __iter__(self) -> Iterator[Delta]:
        # One delta at a time from the same batches; a partly consumed batch stays on the stream (not in a
        # generator frame), so a new iterator picks up where an abandoned one stopped.
        while True:
            if not self._pending:
                batch = next(self.batches(), None)
                if batch is None:
                    return
                self._pending.extend(batch)
            yield self._pending.popleft()

    def batches(self) -> Iterator[list[Delta]]:
        if self._on_item is not None:
            raise TypeError("this stream hands its items to a callback; it cannot be iterated")
        if self._pending:
            yield list(self._pending)
            self._pending.clear()
        while self._open:
            deltas = self._take([self._queue.get()])
            if deltas:
                yield deltas

    def ready(self) -> list[Delta]:
        """What has arrived, without waiting (for a driver that runs the engine's steps itself)."""
        out = list(self._pending)
        self._pending.clear()
        return out + self._take([])

    @property
    def finished(self) -> bool:
        """Every request of the stream has ended (and its last items were taken)."""
        return not self._open and not self._pending and self._queue.empty()

    def _take(self, items: list[Delta | BaseException | None]) -> list[Delta]:
        """These items and whatever else is queued, as deltas; counts the requests that ended, raises an error."""
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        deltas = []
        for item in items:
            if item is None:
                self._open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                deltas.append(item)
        return deltas

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, item: Delta | BaseException | None) -> None:
        if self._on_item is not None:
            self._on_item(item)
        else:
            self._queue.put(item)


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    stream: Stream
    state: RowState
    tokens: list[int] = field(default_factory=list)  # prompt + generated: the row's slots hold these
    # Made on the engine's thread at admission: its tensors go to the model's device, and a host-to-device copy
    # from the caller's thread (the event loop) would wait there for the engine's queued GPU work.
    sampler: Sampler | None = None
    slot: int = BASE  # the adapter pool's slot this request's rows use (held from submit until it ends)
    filled: int = 0  # prompt tokens in the cache so far (a prompt prefilled in chunks)
    tokenizer: Tokenizer | None = None  # this request's (an adapter's own, or the engine's)
    # Scored as the prompt is prefilled (params.prompt_logprobs), handed out with the request's first event
    prompt_lps: list[TokenLogprob | None] | None = None
    constraint: RowConstraint | None = None  # its grammar's matcher (made at admission, on the engine's thread)

    @property
    def next_slot(self) -> int:
        return len(self.tokens) - 1  # the last token is fed at its own position


_ENGINES: weakref.WeakSet[BatchEngine] = weakref.WeakSet()

# Waiting requests are prefilled together, right-padded to the longest, up to this many tokens in all (a request
# longer than this goes alone): one forward for a burst of prompts, without an activation spike for long ones.
MAX_PREFILL_TOKENS = 4096
# A prompt longer than this that arrives while other rows decode is prefilled this many tokens a step, between their
# decode steps, so a long prompt delays their next token by one chunk's forward, not by its whole prefill.
PREFILL_CHUNK = 512


def shared_prompts(keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """(indices of each key's first occurrence, and for each key the position of its first occurrence among
    those): the prompts to run, and where each request's prompt was run."""
    firsts: list[int] = []
    seen: dict[Hashable, int] = {}
    source = []
    for i, key in enumerate(keys):
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(i)
        source.append(seen[key])
    return firsts, source


def _only_scored(request: _Request) -> bool:
    """A request that generates nothing: it ends at its prefill (scoring its prompt) and never takes a row."""
    return request.params.max_new_tokens == 0


@atexit.register
def _close_all() -> None:
    """Stop every engine's thread before the interpreter tears torch down under it (which aborts the process)."""
    for engine in list(_ENGINES):
        engine.close()


class BatchEngine:
    """Serves one model to many callers at once. Thread-safe `submit`; the decode loop runs in its own thread, or,
    made with `threaded=False`, on the thread that calls `step()` (the synchronous driver `Generator` is)."""

    def __init__(self, model: Llama, tokenizer: Tokenizer | None, max_batch_size: int = 32,
                 max_seq_length: int | None = None, idle_free_s: float = 60.0,
                 adapters: AdapterPool | None = None, compile: bool | None = None, threaded: bool = True,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS, sync_every: int = 1,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.threaded = threaded
        self.max_prefill_tokens = max_prefill_tokens  # padded prompt tokens prefilled in one forward
        self.prefill_chunk = prefill_chunk
        # The request being prefilled a chunk a step; its cache row is the one after the live rows.
        self._prefilling: _Request | None = None
        # Decode steps between reads of the sampled tokens back to the host: the host queues the next step without
        # waiting for the device (Generator on a GPU: 8; served streams: 1, every token as it comes).
        self.sync_every = sync_every
        self._pending: list[tuple[Tensor, list[Tensor | None]]] = []  # steps not yet read back: (tokens, logprobs)
        self._carry: tuple[Tensor, Tensor] | None = None  # the next step's (tokens, slots) while the rows stay
        # Decode base-only batches with the compiled static step (static_step.py); default on a GPU only. A failure
        # in it (other than memory) turns it off for this engine, with a warning: the eager step serves on.
        self.compile = model.device.type == "cuda" if compile is None else compile
        self._static: StaticStep | None = None
        self.adapters = adapters  # LoRA adapters rows may name (installed in `model`); None: the base alone
        self.max_batch_size = max_batch_size
        self.max_seq_length = min(max_seq_length or model.config.max_position_embeddings,
                                  model.config.max_position_embeddings)
        self.eos = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        self._waiting: queue.Queue[_Request] = queue.Queue()
        self._live: list[_Request] = []  # index = cache row
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._retiring = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.idle_free_s = idle_free_s  # free the KV cache after this long with nothing to do

    # ---- callers ----

    def submit(self, prompt: list[int], params: SamplingParams, index: int = 0, stream: Stream | None = None,
               adapter: str | None = None, tokenizer: Tokenizer | None = None) -> Stream:
        """Queue a request; returns its Stream at once. Raises ValueError / ContextLengthError for a bad request.

        `adapter`: a name loaded in the engine's `AdapterPool` (None: the base model); `tokenizer`: the one this
        request's text is decoded with and whose EOS ends it (an adapter's own; default the engine's)."""
        tokenizer = tokenizer or self.tokenizer
        check_context(len(prompt), params.max_new_tokens, self.max_seq_length)
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if adapter is not None and self.adapters is None:
            raise ValueError(f"adapter {adapter!r} asked of an engine without an adapter pool")
        stream = stream or Stream()
        eos = self.eos | set(tokenizer.eos_token_ids if tokenizer else ())
        stop_ids = set(params.stop_token_ids) if params.stop_token_ids is not None else eos
        request = _Request(list(prompt), params, stream, RowState(index, tokenizer, params, stop_ids), list(prompt),
                           tokenizer=tokenizer)
        if params.prompt_logprobs is not None:
            request.prompt_lps = [None]  # the first token has nothing before it
        if adapter is not None and self.adapters is not None:
            request.slot = self.adapters.acquire(adapter)
        if self.threaded:
            self._ensure_running()
        _ENGINES.add(self)
        self._waiting.put(request)
        self._wake.set()
        return stream

    def stream(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Generator[list[Delta], None, None]:
        """`Generator.stream`'s interface over the shared batch: one Delta list per step that produced something.
        Closing the iterator (a client that went away) cancels its requests."""
        out = self.submit_all(prompts, params)
        try:
            yield from out.batches()
        finally:
            out.cancel()

    def submit_all(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                   on_item: Callable[[Delta | BaseException | None], None] | None = None,
                   adapter: str | None = None, tokenizer: Tokenizer | None = None) -> Stream:
        """Queue every prompt (row i of the result is prompt i) on one Stream, or none of them: a bad one raises
        before any runs. With `on_item`, the Stream pushes its items to that callback (see `Stream`); `adapter`
        and `tokenizer` as `submit` takes them, for every row."""
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        params = params or SamplingParams()
        per_row = [params] * len(ids) if isinstance(params, SamplingParams) else list(params)
        for row_ids, p in zip(ids, per_row):
            check_context(len(row_ids), p.max_new_tokens, self.max_seq_length)
            if p.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
        out = Stream(len(ids), on_item)
        for i, (row_ids, p) in enumerate(zip(ids, per_row)):
            self.submit(row_ids, p, index=i, stream=out, adapter=adapter, tokenizer=tokenizer)
        return out

    def close(self) -> None:
        """Stop now: requests still running or waiting end with an EngineClosedError (never left hanging)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._thread is None or not self._thread.is_alive():  # nothing decodes any more: free its cache
            self._end_all(EngineClosedError("the model was unloaded while this request ran (the server is "
                                            "shutting down); retry the request"))
            self._free_cache()

    def retire(self) -> None:
        """Stop once the requests already submitted have finished (a model evicted from a server's cache: its
        streams run to their end, then its cache is freed). Returns at once."""
        self._retiring.set()
        self._wake.set()

    def _end_all(self, error: BaseException) -> None:
        for r in self._in_flight():
            r.stream._put(error)
            self._done(r)
        self._live, self._pending, self._carry, self._prefilling = [], [], None, None

    def _in_flight(self) -> list[_Request]:
        """Every request not yet ended, taking the waiting ones off the queue."""
        return self._live + ([self._prefilling] if self._prefilling else []) + self._drain_waiting()

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
                self._thread.start()

    # ---- the loop ----

    def _loop(self) -> None:
        device = self.model.device
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # Triton launches on this thread's current device, whatever the tensors'
        with torch.inference_mode():
            while not self._stop.is_set():
                if self._busy():
                    continue
                if self._retiring.is_set():
                    self._free_cache()
                    return
                if not self._wake.wait(timeout=self.idle_free_s):
                    self._free_cache()
                else:
                    self._wake.clear()

    def _busy(self) -> bool:
        """Step while there is work; False once there is none. The merged projections are checked once for the
        whole busy spell, not at every step."""
        with merged_projections(self.model):
            ran = False
            while not self._stop.is_set() and self.step():
                ran = True
            return ran

    def step(self) -> bool:
        """One turn of the loop: drop cancelled rows, admit waiting requests, decode one token for every live row.
        Returns whether requests remain (live or waiting). A failure no single request can be blamed for fails
        every request in flight, never silently, and is raised."""
        try:
            self.drop_cancelled()
            self._admit()
            if self._live:
                self._decode()
            return bool(self._live) or self._prefilling is not None or not self._waiting.empty()
        except BaseException as e:
            for r in self._in_flight():
                r.stream._put(e)
            self._live, self._pending, self._carry, self._prefilling = [], [], None, None
            raise

    def _free_cache(self) -> None:
        """Idle: give the KV cache back (the next request reallocates), to the device too, not just to torch's
        allocator, so a training job sharing the GPU can use it."""
        self.model.clear_caches()
        release_memory(collect=False)

    def _drain_waiting(self) -> list[_Request]:
        out = []
        while not self._waiting.empty():
            out.append(self._waiting.get_nowait())
        return out

    def _ensure_cache(self, rows: int, slots: int) -> None:
        """Grow the KV cache to at least (rows, slots), keeping the live rows' contents.

        The cache starts small and grows with demand (slots in steps of 256, rows by doubling), so an adapter that
        serves one short request at a time does not hold a max_batch x max_seq_length cache.
        """
        shape = self.model.cache_shape
        if shape is not None and shape[0] >= rows and shape[1] >= slots:
            return
        old_rows, old_slots = shape or (0, 0)
        new_rows = min(self.max_batch_size, max(old_rows, 1 << max(0, rows - 1).bit_length()))
        # Compiled, slots double (from 256): each size is a captured shape of its own.
        grown = max(256, 1 << (slots - 1).bit_length()) if self.compile else -(-slots // 256) * 256
        new_slots = min(self.max_seq_length, max(old_slots, grown))
        # Every layer's new cache is allocated before any replaces the old one: running out of memory half way
        # leaves the old caches whole, and only the request that asked for more fails.
        new = self.model.new_caches(new_rows, new_slots)
        live = len(self._live) + (self._prefilling is not None)  # a row being prefilled is kept too
        used = max([len(r.tokens) for r in self._live] + [len(self._prefilling.prompt) if self._prefilling else 0])
        for block, cache in zip(self.model.blocks(), new):
            old = block.self_attn.kv_cache
            if old is not None:
                cache.k[:live, :, :used] = old.k[:live, :, :used]
                cache.v[:live, :, :used] = old.v[:live, :, :used]
            block.self_attn.kv_cache = cache

    def _caches(self) -> list[KVCache]:
        caches = [b.self_attn.kv_cache for b in self.model.blocks()]
        return [c for c in caches if c is not None]

    def _admit(self) -> None:
        if (self._prefilling or not self._waiting.empty()) and len(self._live) < self.max_batch_size:
            self._flush()  # the live rows' tokens on the host before new rows join them
        prefilled = self._prefilling is not None
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)  # one chunk a step; the waiting requests wait for it
        while self._prefilling is None and len(self._live) < self.max_batch_size and not self._waiting.empty():
            group = self._ready(self._take_waiting(self.max_batch_size - len(self._live)))
            prefilled = prefilled or bool(group)
            if len(group) == 1 and self._chunked(group[0]):
                self._prefill_chunk(group[0])
            else:
                self._admit_group(group)
        if prefilled and self._static is not None:
            self._static.check()  # a prefill may have grown the cache: graphs captured on the old one are stale

    def _chunked(self, request: _Request) -> bool:
        """Whether the request's prompt is prefilled a chunk a step: a long one, while other rows decode."""
        return len(request.prompt) > self.prefill_chunk and bool(self._live)

    def _take_waiting(self, room: int) -> list[_Request]:
        """Waiting requests to prefill together, in order: at most `room`, and at most `max_prefill_tokens` once
        padded to the longest (the first one always)."""
        group = [self._waiting.get_nowait()]
        if self._chunked(group[0]):
            return group
        longest = len(group[0].prompt)
        with self._waiting.mutex:  # peek before taking: a request that would not fit waits for the next group
            pending = self._waiting.queue
            while len(group) < room and pending and not self._chunked(pending[0]):
                longer = max(longest, len(pending[0].prompt))
                if longer * (len(group) + 1) > self.max_prefill_tokens:
                    break
                group.append(pending.popleft())
                longest = longer
        return group

    def _ready(self, group: list[_Request]) -> list[_Request]:
        """The group's requests still wanted, each with its sampler (made here, on the engine's thread); one whose
        sampler cannot be made (a seed torch refuses) ends alone."""
        ready = []
        for request in group:
            if request.stream.cancelled.is_set():
                self._done(request)
                continue
            if request.params.max_new_tokens == 0 and request.prompt_lps is None:
                self._end_scored(request)  # nothing to generate and nothing to score
                continue
            try:
                request.sampler = Sampler([request.params], self.model.config.vocab_size, self.model.device,
                                          [request.state.stop_ids])
                request.sampler.observe_prompt(0, request.prompt)
                request.constraint = self._constraint_of(request)
            except Exception as e:
                request.stream._put(self._request_error(request, e))
                self._done(request)
                continue
            ready.append(request)
        return ready

    def _constraint_of(self, request: _Request) -> RowConstraint | None:
        if request.params.constraint is None:
            return None
        if request.tokenizer is None:
            raise ValueError("constrained decoding needs a tokenizer")
        return RowConstraint(request.params.constraint, request.tokenizer, sorted(request.state.stop_ids))

    def _admit_group(self, group: list[_Request]) -> bool:
        """Prefill the group into the next free rows and make them live; when the batched prefill fails, each
        request is prefilled alone, so the failure ends only the request it belongs to (it never took a row)."""
        if not group:
            return False
        group.sort(key=_only_scored)  # those ending at their prefill take the rows after the ones that go live
        try:
            logits = self._prefill(group)
        except Exception as e:
            if len(group) > 1:
                alone = [self._admit_group([request]) for request in group]  # every one, not up to the first
                return any(alone)
            group[0].stream._put(self._request_error(group[0], e))
            self._done(group[0])
            return False
        live = [r for r in group if not _only_scored(r)]
        for request in group[len(live):]:
            self._end_scored(request)
        if not live:
            return False
        self._live.extend(live)
        self._carry = None
        self._advance(live, logits[:len(live)])
        return True

    def _score_prompt(self, request: _Request, hidden: Tensor, start: int) -> None:
        """Score the prompt tokens after positions start .. start + T - 1 from those positions' hidden states
        (T, C), where the request asked for its prompt's logprobs."""
        if request.prompt_lps is None or request.params.prompt_logprobs is None:
            return
        targets = request.prompt[start + 1:start + 1 + hidden.size(0)]
        request.prompt_lps += prompt_token_logprobs(self.model.lm_head, hidden[:len(targets)], targets,
                                                    request.params.prompt_logprobs, request.tokenizer)

    def _end_scored(self, request: _Request) -> None:
        """A request for no new tokens ends once its prompt is scored: one event with the prompt's logprobs."""
        request.state.finish = "length"
        request.stream._put(Delta(request.state.index, "", [], [] if request.params.logprobs is not None else None,
                                  "length", prompt_logprobs=request.prompt_lps))
        self._done(request)

    def _request_error(self, request: _Request, e: Exception) -> Exception:
        """What the request's caller is told: running out of memory is capacity (retry later), anything else the
        error itself. Either way it ends that request only; the engine goes on with the others."""
        if isinstance(e, torch.OutOfMemoryError | MemoryError):
            return CapacityError(
                f"not enough {self.model.device.type} memory for this request now ({len(request.prompt)} prompt "
                f"tokens, {request.params.max_new_tokens} to generate, beside {len(self._live)} running): "
                "retry later, or ask for fewer tokens")
        return e

    def _fail(self, request: _Request, e: Exception) -> None:
        """End one live request with an error and give its row back."""
        request.stream._put(self._request_error(request, e))
        self._retire(request)

    def _prefill_chunk(self, request: _Request) -> bool:
        """Prefill the request's next `prefill_chunk` prompt tokens into the row after the live ones; at its last
        chunk it becomes live (True). A failure ends it alone."""
        row, dev, done = len(self._live), self.model.device, request.filled
        try:
            if done == 0:
                reserve = max(len(r.prompt) + r.params.max_new_tokens for r in [*self._live, request])
                self._ensure_cache(row + 1, reserve)
                self._prefilling = request
            chunk = request.prompt[done:done + self.prefill_chunk]
            ids = torch.tensor([chunk], device=dev)
            pos = torch.arange(done, done + len(chunk), device=dev)[None]
            with self._adapters_of([request], len(chunk)):
                hidden = self.model.hidden_states(ids, pos, None, pos, cache_row=row)
            self._score_prompt(request, hidden[0], done)
            request.filled = done + len(chunk)
            if request.filled < len(request.prompt):
                return False
            if _only_scored(request):
                self._prefilling = None
                self._end_scored(request)
                return True
            logits = self.model.lm_head(hidden[:, -1]).float()
        except Exception as e:
            self._prefilling = None
            request.stream._put(self._request_error(request, e))
            self._done(request)
            return False
        self._prefilling = None
        self._live.append(request)
        self._carry = None
        self._advance([request], logits)
        return True

    def _prefill(self, requests: list[_Request]) -> Tensor:
        """Grow the cache for the requests, run their prompts into the next free rows (right-padded: the padding
        lands in slots a row's own decode overwrites before it attends to them), and return each one's next-token
        logits. Requests with the same prompt on the same adapter (a GRPO group, a request's `n` choices) share one
        prompt forward: its cache row is copied to theirs."""
        row, dev = len(self._live), self.model.device
        reserve = max(len(r.prompt) + r.params.max_new_tokens for r in self._live + requests)
        self._ensure_cache(row + len(requests), reserve)
        firsts, source = shared_prompts([(tuple(r.prompt), r.slot) for r in requests])
        run = [requests[i] for i in firsts]
        t = max(len(r.prompt) for r in run)
        ids = torch.tensor([r.prompt + [0] * (t - len(r.prompt)) for r in run], device=dev)
        pos = torch.arange(t, device=dev).expand(len(run), t)
        with self._adapters_of(run, t):
            hidden = self.model.hidden_states(ids, pos, None, pos, cache_row=row)
        for i, r in enumerate(requests):
            self._score_prompt(r, hidden[source[i], :len(r.prompt)], 0)
        for i in reversed(range(len(requests))):  # sources sit at or before their copies: nothing is overwritten
            if source[i] != i:  # before it is read
                for cache in self._caches():
                    cache.move_row(row + source[i], row + i, t)
        last = torch.tensor([len(r.prompt) - 1 for r in run], device=dev)
        logits = self.model.lm_head(hidden[torch.arange(len(run), device=dev), last]).float()
        return logits if len(run) == len(requests) else logits[torch.tensor(source, device=dev)]

    def _decode(self) -> None:
        """One token for every live row. Its tokens stay on the device until a read-back (`_flush`): every step
        when `sync_every` is 1, else once per `sync_every` steps, or sooner when the host must act (a row reaches
        its token limit, a request waits, a sampler failed)."""
        live = list(self._live)
        tokens, positions = self._inputs(live)
        try:
            logits = self._step(live, 0, tokens, positions)
        except Exception:  # whose fault? Each row alone tells: the rows that still fail end, the others go on
            self._flush()
            self._decode_rows_alone(live)
            return
        chosen, lps, failed = self._choose(live, logits)
        self._pending.append((chosen, lps))
        self._carry = (chosen, positions + 1)
        if failed or len(self._pending) >= self.sync_every or self._must_read(live):
            self._flush(failed)

    def _inputs(self, live: list[_Request]) -> tuple[Tensor, Tensor]:
        """(B,) next tokens and their slots on the device: carried over from the last step while the batch holds
        the same rows (no host data: on a GPU a tensor built from host data is a blocking copy), else built from
        the rows' host state."""
        if self._carry is not None:
            return self._carry
        dev = self.model.device
        return (torch.tensor([r.tokens[-1] for r in live], device=dev),
                torch.tensor([r.next_slot for r in live], device=dev))

    def _must_read(self, live: list[_Request]) -> bool:
        """Whether the host must see the tokens now: a row reaches its token limit (decoding on would run past its
        reserved cache slots), a request waits for a free row, or one was cancelled."""
        steps = len(self._pending)
        return ((not self._waiting.empty() and len(live) < self.max_batch_size)
                or any(r.constraint is not None for r in live)  # its next mask needs this token taken
                or any(len(r.state.token_ids) + steps >= r.params.max_new_tokens or r.stream.cancelled.is_set()
                       for r in live))

    def _flush(self, failed: dict[int, Exception] | None = None) -> None:
        """Read the pending steps' tokens back (one device sync), hand them out row by row, and retire the rows
        that finished or failed."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        live = list(self._live)
        tokens = torch.stack([c for c, _ in pending], dim=1).tolist()  # (B, steps)
        failed = dict(failed or {})
        last = len(pending) - 1
        for i, r in enumerate(live):
            for j, (tok, (_, lps)) in enumerate(zip(tokens[i], pending)):
                if r.state.finish is not None or (j == last and i in failed):
                    break
                try:
                    self._emit(r, tok, lps[i])
                except Exception as e:
                    failed[i] = e
                    break
        self._end_rows(live, failed)

    def _step(self, requests: list[_Request], first_row: int, tokens: Tensor, positions: Tensor) -> Tensor:
        """Next-token logits of consecutive live rows from `first_row` on (their cache rows), each feeding its
        token (B,) at its slot (B,)."""
        if self.compile and first_row == 0 and all(r.slot == BASE for r in requests):
            try:
                static = self._static_step()  # outside the context: its address check sees no merged buffers
                with self._adapters_of(requests, 1):
                    return static(tokens, positions)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:
                warnings.warn(f"the compiled decode step failed ({type(e).__name__}: {e}); this engine decodes "
                              "eagerly from now on", RuntimeWarning, stacklevel=2)
                self.compile = False
        with self._adapters_of(requests, 1):
            hidden = self.model.hidden_states(tokens[:, None], positions[:, None], None, positions[:, None],
                                              cache_row=first_row)
        return self.model.lm_head(hidden[:, -1]).float()

    def _static_step(self) -> StaticStep:
        if self._static is None:
            self._static = StaticStep(self.model)
            self._static.check()
        return self._static

    @contextlib.contextmanager
    def _adapters_of(self, requests: list[_Request], tokens_per_row: int) -> Iterator[None]:
        """Each row's adapter for the forward inside (nothing to do without a pool or with only base rows), and
        merged projections where the layers are plain ones (merged.py)."""
        with merged_projections(self.model):
            if self.adapters is None:
                yield
                return
            self.adapters.use([r.slot for r in requests], tokens_per_row)
            try:
                yield
            finally:
                self.adapters.clear()

    def _decode_rows_alone(self, live: list[_Request]) -> None:
        """A batched step failed: run each row by itself (a row's cache slot is rewritten with the same values)."""
        ok: list[tuple[_Request, Tensor]] = []
        failed: list[tuple[_Request, Exception]] = []
        dev = self.model.device
        for row, r in enumerate(live):
            try:
                token, slot = torch.tensor([r.tokens[-1]], device=dev), torch.tensor([r.next_slot], device=dev)
                ok.append((r, self._step([r], row, token, slot)))
            except Exception as e:
                failed.append((r, e))
        if ok:
            self._advance([r for r, _ in ok], torch.cat([logits for _, logits in ok]))
        for r, error in failed:
            self._fail(r, error)

    def _advance(self, requests: list[_Request], logits: Tensor) -> None:
        """Sample each request's next token from its row of logits, hand out text, retire finished rows, now. A
        request whose sampling or output fails ends alone."""
        chosen, lps, failed = self._choose(requests, logits)
        for i, (r, tok) in enumerate(zip(requests, chosen.tolist())):  # one device sync for every row
            if i in failed:
                continue
            try:
                self._emit(r, tok, lps[i])
            except Exception as e:
                failed[i] = e
        self._end_rows(requests, failed)

    def _choose(self, requests: list[_Request], logits: Tensor
                ) -> tuple[Tensor, list[Tensor | None], dict[int, Exception]]:
        """Each row's next token (B,) on the device, its logprobs where asked, and the rows whose sampling failed.
        Plain greedy rows share one argmax; the others sample with their own state (seeds, penalties). Rows held
        to a grammar have the tokens it does not allow masked first."""
        constrained = [(i, r.constraint) for i, r in enumerate(requests) if r.constraint is not None]
        if constrained:
            apply_masks(logits, [i for i, _ in constrained], [c for _, c in constrained])
        chosen = logits.argmax(-1)
        sampled: list[tuple[int, Tensor]] = []
        lps: list[Tensor | None] = [None] * len(requests)
        failed: dict[int, Exception] = {}
        for i, r in enumerate(requests):
            assert r.sampler is not None  # made at admission
            if r.sampler.plain_greedy and r.params.logprobs is None:
                continue
            row_logits = logits[i : i + 1]
            try:
                token = r.sampler.sample(row_logits)
                lps[i] = step_logprobs(row_logits, token, r.params.logprobs)
            except Exception as e:
                failed[i] = e
                continue
            sampled.append((i, token))
        if sampled:
            rows = torch.tensor([i for i, _ in sampled], device=chosen.device)
            chosen = chosen.index_copy(0, rows, torch.cat([t for _, t in sampled]))
        return chosen, lps, failed

    def _end_rows(self, requests: list[_Request], failed: dict[int, Exception]) -> None:
        """Fail the rows that failed, retire the rows that finished."""
        for i, error in failed.items():
            self._fail(requests[i], error)
        for r in [r for i, r in enumerate(requests) if i not in failed and r.state.finish is not None]:
            self._retire(r)

    def _emit(self, r: _Request, tok: int, lps: Tensor | None) -> None:
        before = len(r.state.token_ids)
        if r.constraint is not None:
            r.constraint.accept(tok)
        r.state.push(tok)
        if r.constraint is not None and r.constraint.done:
            r.state.end()
        r.tokens.append(tok)
        new = r.state.token_ids[before:]
        new_lps = None
        if r.params.logprobs is not None:
            new_lps = [token_logprob(r.tokenizer, tok, lps[0].tolist(), r.params.logprobs)] if (
                new and lps is not None) else []
        text = r.state.take()
        prompt_lps, r.prompt_lps = r.prompt_lps, None
        if text or new or r.state.finish is not None or prompt_lps is not None:
            r.stream._put(Delta(r.state.index, text, new, new_lps, r.state.finish, r.state.stop_token_id,
                                prompt_logprobs=prompt_lps))

    def drop_cancelled(self) -> None:
        """Free the rows of cancelled requests (their clients went away)."""
        if any(r.stream.cancelled.is_set() for r in self._live):
            self._flush()
        for r in [r for r in self._live if r.stream.cancelled.is_set()]:
            self._retire(r)
        if self._prefilling is not None and self._prefilling.stream.cancelled.is_set():
            self._done(self._prefilling)
            self._prefilling = None

    def _retire(self, request: _Request) -> None:
        row = self._live.index(request)
        last = len(self._live) - 1
        if row != last:  # move the last live row into the hole so live rows stay [0, B)
            moved = self._live[last]
            for cache in self._caches():
                cache.move_row(last, row, len(moved.tokens))
            self._live[row] = moved
        self._live.pop()
        if self._prefilling is not None:  # its row stays the one after the live rows
            for cache in self._caches():
                cache.move_row(last + 1, last, self._prefilling.filled)
        self._carry = None  # the batch's rows changed: the next step's inputs come from the rows' host state
        self._done(request)

    def _done(self, request: _Request) -> None:
        """The request has ended: its adapter slot may be reused, and its stream hears the end."""
        if self.adapters is not None:
            self.adapters.release(request.slot)
            request.slot = BASE
        request.stream._put(None)
