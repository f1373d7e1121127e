"""The engine core: one thread owns the llama.cpp context and runs the step loop.

A step: the scheduler decides (a StepPlan), the runner fills the batch, decodes and samples, the core hands
the sampled tokens back to the scheduler's requests and out to the front as token ids. The core never
formats text: detokenizing and stop strings are the front's (engine.py). Messages come in through `post`
(from the pipe's reader thread) and go out through `send` (to the pipe's writer thread), so the loop itself
never waits on a socket or pickles.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from server.engine.config import EngineConfig
from server.engine.cpu_share import ThreadGovernor
from server.engine.llama_context import LlamaRuntime
from server.engine.protocol import (
    AbortRequests,
    AddRequest,
    ChoiceFailed,
    EmbedRequest,
    Shutdown,
    StatsUpdate,
    StepOutputs,
    ToCore,
    ToFront,
    TokenOutput,
)
from server.engine.request import Request, RequestStatus
from server.engine.runner import Launched, Runner, Sampled
from server.engine.sampling import Sampler
from server.engine.scheduler import Scheduler
from server.engine.spec.speculator import Drafter, Speculator
from server.engine.stats import EngineStats
from server.engine.step_plan import StepPlan
from server.engine.step_profile import StepProfile

log = logging.getLogger(__name__)


class EngineCore:
    """Requests in, token ids out, over one LlamaRuntime. `run()` is the loop; other threads only `post`."""

    def __init__(self, runtime: LlamaRuntime, config: EngineConfig, send: Callable[[ToFront], None],
                 on_embed: Callable[[EmbedRequest], None] | None = None,
                 drafter: Drafter | None = None) -> None:
        self.rt = runtime
        self.config = config
        self._send = send
        self._on_embed = on_embed
        kv_cells = min(runtime.kv_cells, config.kv_cells_override or runtime.kv_cells)
        self.scheduler = Scheduler(runtime, n_slots=runtime.n_seq_max, kv_cells=kv_cells,
                                   n_batch=min(config.n_batch, runtime.n_batch), unified=runtime.kv_unified,
                                   prefix_cache=config.prefix_cache and runtime.can_reuse_prefix)
        self.scheduler.on_leave = self._unbind
        self.runner = Runner(runtime)
        self.spec: Speculator | None = None
        if config.speculates:
            self.spec = Speculator(config, output_on_gpu=runtime.output_on_gpu, drafter=drafter)
            self.scheduler.draft = self.spec.drafts
        self.overlap = runtime.output_on_gpu if config.overlap is None else config.overlap
        # With layers on the CPU and no thread count given, the threads follow the cores left free.
        on_cpu = runtime.placement.n_gpu_layers < runtime.placement.n_layer + 1
        self.governor = (ThreadGovernor(config.threads)
                         if on_cpu and config.n_threads is None and config.n_threads_batch is None else None)
        self.n_threads = config.threads
        self.profile = StepProfile()
        self._cond = threading.Condition()
        self._inbox: list[ToCore] = []
        self._requests: dict[int, list[Request]] = {}
        self._eog = runtime.eog_tokens()
        self._stats_dirty = False
        self.c = _Counters()

    # --- from other threads ---------------------------------------------------------------------------------

    def post(self, *messages: ToCore) -> None:
        """Messages for the loop, taken in together between two steps."""
        with self._cond:
            self._inbox.extend(messages)
            self._cond.notify()

    # --- the loop -------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Until Shutdown. On the CPU llama_decode computes in place; on a GPU it queues the graph, so the
        outputs of one step go out while the device computes the next."""
        try:
            self._loop_overlap() if self.overlap else self._loop_normal()
        finally:
            self.runner.close()
            if self.spec is not None:
                self.spec.close()

    def _loop_normal(self) -> None:
        while self._take_input(block=not self.scheduler.has_work):
            out = self.step()
            if out is not None:
                self._deliver(out)

    def step(self) -> StepOutputs | None:
        """One step: plan, decode, sample, update. None when nothing could run."""
        launched = self._launch(self.scheduler.schedule())
        if launched is None:
            return None
        return self._update(launched, self._collect(launched))

    def _loop_overlap(self) -> None:
        inflight: Launched | None = None
        while True:
            out = self._update(inflight, self._collect(inflight)) if inflight is not None else None
            if not self._take_input(block=not self.scheduler.has_work and out is None):
                if out is not None:
                    self._deliver(out)
                return
            inflight = self._launch(self.scheduler.schedule())
            if out is not None:
                self._deliver(out)

    # --- requests in ----------------------------------------------------------------------------------------

    def _take_input(self, block: bool) -> bool:
        """Apply what the front sent (between steps: no step is in flight). False on Shutdown."""
        with self._cond:
            while block and not self._inbox:
                if self._stats_dirty:
                    break
                self._cond.wait()
                self.profile.start()  # idle time is no phase of a step
            inbox, self._inbox = self._inbox, []
        if not inbox and self._stats_dirty:
            self._send(StatsUpdate(self.stats()))  # idle now: the front sees the final counts
            self._stats_dirty = False
            return self._take_input(block)
        for msg in inbox:
            if isinstance(msg, AddRequest):
                self._add(msg)
            elif isinstance(msg, AbortRequests):
                self._abort(msg)
            elif isinstance(msg, EmbedRequest) and self._on_embed is not None:
                self._on_embed(msg)
            elif isinstance(msg, Shutdown):
                return False
        return True

    def _add(self, msg: AddRequest) -> None:
        reqs: list[Request] = []
        for choice, params in enumerate(msg.params):
            req = Request(msg.req_id, list(msg.prompt), params, choice=choice,
                          leader=reqs[0] if reqs else None)
            if self.spec is not None:
                self.spec.attach(req)
            # Choices without a seed of their own must not share the engine's default one.
            seed = None if self.config.seed is None else self.config.seed + choice
            try:
                req.sampler = Sampler(params, n_vocab=self.rt.n_vocab, eog_tokens=self._eog,
                                      default_seed=seed, offload=self._offload(req), vocab=self.rt.vocab)
            except ValueError as exc:  # the front checked it: still, one request must not end the loop
                self._send(ChoiceFailed(msg.req_id, choice, str(exc)))
                continue
            req.sampler.accept_prompt(req.tokens)
            reqs.append(req)
            self.c.prompt_tokens += req.n_prompt
            self.scheduler.submit(req)
        if reqs:
            self._requests[msg.req_id] = reqs

    def _offload(self, req: Request) -> bool:
        """Whether a request's chain runs inside the decode graph (EngineConfig holds the measured rule). A
        request that drafts never does: verifying its draft reads a logits row per draft token on the host."""
        if req.spec is not None:
            return False
        params = req.params
        active = len(self.scheduler.running) + len(self.scheduler.waiting)
        return self.config.sample_in_graph(self.rt.output_on_gpu, params.sorts_vocabulary, active)

    def _abort(self, msg: AbortRequests) -> None:
        reqs = self._requests.get(msg.req_id, [])
        status = RequestStatus.FINISHED_STOPPED if msg.finished else RequestStatus.FINISHED_ABORTED
        for req in reqs:
            if not req.is_finished and (not msg.choices or req.choice in msg.choices):
                self._finish(req, status)
        self._stats_dirty = True

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        if status == RequestStatus.FINISHED_ABORTED:
            self.c.cancelled += 1
        else:
            self.c.finished += 1
        if req.sampler is not None:
            req.sampler.free()
            req.sampler = None
        if self.spec is not None:
            self.spec.detach(req)
        choices = self._requests.get(req.req_id)
        if choices is not None and all(r.is_finished for r in choices):
            del self._requests[req.req_id]

    def _unbind(self, req: Request) -> None:
        # The request leaves its slot (finished, aborted, preempted): its chain leaves the graph with it.
        if req.sampler is not None:
            req.sampler.unbind(self.rt)

    # --- one step -------------------------------------------------------------------------------------------

    def _launch(self, plan: StepPlan) -> Launched | None:
        """Start `plan` on llama.cpp (retrying with freed room when it finds none). None: nothing runs."""
        if self.governor is not None and not plan.is_empty:
            threads = self.governor.look()
            if threads != self.n_threads:
                log.info("CPU threads %d -> %d (cores free of other processes)", self.n_threads, threads)
                self.rt.set_threads(threads)
                self.n_threads = threads
        while not plan.is_empty:
            launched = self.runner.fill(plan)
            self.profile.mark("schedule")
            rc = self.runner.decode()
            self.profile.mark("decode")
            if rc == 0:
                self.scheduler.commit(plan)
                self.c.count_step(plan)
                return launched
            if rc == 1 and self.scheduler.on_no_kv_slot():
                log.info("KV cache full: freed room (preemptions so far: %d)", self.scheduler.preemptions)
                plan = self.scheduler.schedule(admit=False)
                continue
            self._fail(plan, f"llama_decode failed with status {rc}")
            return None
        if self.scheduler.has_work:
            with self._cond:  # nothing could be scheduled: wait for a change instead of spinning
                self._cond.wait(0.01)
            self.profile.start()
        return None

    def _collect(self, step: Launched) -> list[Sampled]:
        self.rt.synchronize()
        self.profile.mark("wait")
        sampled = self.runner.collect(step)
        self.profile.mark("sample")
        return sampled

    def _update(self, step: Launched, sampled: list[Sampled]) -> StepOutputs:
        """The sampled tokens into their requests; requests that end here leave; the outputs for the front."""
        outputs: list[TokenOutput] = []
        ended: list[tuple[Request, RequestStatus]] = []
        last: Request | None = None
        for s in sampled:
            req = s.req
            if req is last and ended and ended[-1][0] is req:
                continue  # a verified draft went on past the end of its request
            if req is not last:
                self.c.seq_steps += 1
            last = req
            req.tokens.append(s.token)
            self.c.generated += 1
            status: RequestStatus | None = None
            if self.rt.is_eog(s.token) and not req.params.ignore_eos:
                status = RequestStatus.FINISHED_STOPPED
            elif req.n_generated >= req.params.max_tokens:
                status = RequestStatus.FINISHED_LENGTH
            finish = status.finish_reason if status is not None else None
            outputs.append(TokenOutput(req.req_id, req.choice, s.token, finish, s.logprob, s.top))
            if status is not None:
                ended.append((req, status))
        if step.verify:
            self._settle_drafts(step)
        for req, status in ended:
            self._finish(req, status)
        plan = step.plan
        self.profile.mark("emit")
        return StepOutputs(tuple(outputs), plan.n_tokens, len(plan.chunks))

    def _settle_drafts(self, step: Launched) -> None:
        """Count what each draft's verification accepted and drop the KV cells of the draft tokens it
        rejected: every cached position but the newest token's stays (it is fed next step)."""
        assert self.spec is not None
        for req, _, draft in step.verify:
            if req.slot < 0:
                continue  # it left while the step ran (its cells went with it)
            n_old = req.n_cached - 1 - len(draft)  # where the step's first row was
            # the tokens it emitted, less the one the target chose itself
            accepted = min(len(draft), len(req.tokens) - 2 - n_old)
            self.spec.record(req, len(draft), accepted)
            self.scheduler.rollback(req, len(req.tokens) - 1)

    def _deliver(self, out: StepOutputs) -> None:
        """Send a step's outputs with the state after it: the front's view of the core is never older than the
        last step it has read. On a GPU this runs while the device computes the next step."""
        self._send(StepOutputs(out.outputs, out.n_tokens, out.n_seqs, self.stats()))
        self._stats_dirty = False
        self.profile.mark("deliver")

    def _fail(self, plan: StepPlan, message: str) -> None:
        log.error("%s; failing %d requests", message, len(plan.chunks))
        outputs = []
        for chunk in plan.chunks:
            req = chunk.req
            if not req.is_finished:
                outputs.append(TokenOutput(req.req_id, req.choice, -1, "error"))
                self._finish(req, RequestStatus.FINISHED_ERROR)
        self._send(StepOutputs(tuple(outputs), 0, 0, self.stats()))

    # --- observability --------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        sched = self.scheduler
        c = self.c
        spec = self.spec
        with self._cond:
            inbox = sum(len(m.params) for m in self._inbox if isinstance(m, AddRequest))
        return EngineStats(
            is_ready=True, n_slots=len(sched.kv.slots), running=len(sched.running),
            waiting=len(sched.waiting) + inbox, kv_used_cells=sched.kv_used(),
            kv_cached_cells=sched.kv_cached(), kv_total_cells=sched.kv.kv_cells,
            preemptions_total=sched.preemptions, steps_total=c.steps, step_tokens_total=c.step_tokens,
            last_step_tokens=c.last_step_tokens, last_step_seqs=c.last_step_seqs,
            max_step_tokens=c.max_step_tokens, max_step_seqs=c.max_step_seqs,
            prompt_tokens_total=c.prompt_tokens,
            generated_tokens_total=c.generated, prefix_reused_tokens_total=sched.kv.reused_tokens,
            requests_finished_total=c.finished, requests_cancelled_total=c.cancelled,
            sampled_in_graph_total=self.runner.sampled_in_graph_total, step_seconds=self.profile.snapshot(),
            n_threads=self.n_threads, seq_steps_total=c.seq_steps,
            spec_drafted_total=spec.drafted_total if spec else 0,
            spec_accepted_total=spec.accepted_total if spec else 0,
            spec_verified_total=spec.verified_total if spec else 0,
            spec_skipped_steps_total=spec.skipped_steps_total if spec else 0,
        )

    def fail_all(self, message: str) -> None:
        """The loop is ending: every request still open gets an error output (nothing is left hanging)."""
        outputs = [TokenOutput(r.req_id, r.choice, -1, "error")
                   for reqs in self._requests.values() for r in reqs if not r.is_finished]
        if outputs:
            log.info("failing %d open requests: %s", len(outputs), message)
            self._send(StepOutputs(tuple(outputs), 0, 0, None))


class _Counters:
    """The loop's counters (plain ints, only the loop thread writes them)."""

    __slots__ = ("cancelled", "finished", "generated", "last_step_seqs", "last_step_tokens", "max_step_seqs",
                 "max_step_tokens", "prompt_tokens", "seq_steps", "step_tokens", "steps")

    def __init__(self) -> None:
        self.seq_steps = 0  # a sequence that got tokens in a step counts once, however many it got
        self.steps = self.step_tokens = self.last_step_tokens = self.last_step_seqs = 0
        self.max_step_tokens = self.max_step_seqs = self.prompt_tokens = self.generated = 0
        self.finished = self.cancelled = 0

    def count_step(self, plan: StepPlan) -> None:
        n, seqs = plan.n_tokens, len(plan.chunks)
        self.steps += 1
        self.step_tokens += n
        self.last_step_tokens, self.last_step_seqs = n, seqs
        self.max_step_tokens = max(self.max_step_tokens, n)
        self.max_step_seqs = max(self.max_step_seqs, seqs)
