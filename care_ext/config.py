"""One dataclass holding every semantic choice of a CARE run (ARCHITECTURE.md §1, §5, §6).

Where the paper and the official code (``Lumina04/CARE``) differ, the field says which one is the
default and how to get the other. Every field is plain data, so a config round-trips through
``dataclasses.asdict`` / ``CareConfig(**d)`` and is stored inside checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

_INT_MIN = {"group_size": 1, "hidden_size": 1, "seed": None, "global_budget": 0, "warmup_steps": 0,
            "prompt_dim": 1, "resp_hidden_dim": 1, "resp_out_dim": 1, "head_dim": 1,
            "train_steps": 0, "replay_capacity": 0, "replay_batch": 0}
"""Integer fields of :class:`CareConfig` and their least value (None: any int; hidden_size and
global_budget may also be None)."""
_NONNEG_FLOAT = ("soft_adv", "decay_lambda", "adv_eps", "cag_eps", "aux_weight",
                 "class_balance_power", "lr", "weight_decay", "grad_clip")
"""Float fields that must be finite and >= 0 (0 keeps its documented meaning, e.g. no aux head)."""
_BOOL = ("buy_trusted_if_short", "use_cached_labels", "adv_unbiased", "cag_unbiased",
         "train_on_cached", "sim_metrics", "background_update", "background_release_threads")


def ceil_frac(frac: float, n: int) -> int:
    """ceil(frac * n), robust to float noise (0.2 * 5 -> 1, not 2), within [0, n]."""
    return min(n, max(0, math.ceil(frac * n - 1e-9)))


@dataclass
class CareConfig:
    """Configuration of one acquisition run (one :class:`care_ext.step.CareController`).

    Shapes: every batch has B prompts x ``group_size`` rollouts; hidden states have
    ``hidden_size`` columns.
    """

    # --- what to run -------------------------------------------------------------------------
    strategy: str = "care"
    """Registry name (see :data:`care_ext.strategies.STRATEGIES`): gt, ttrl, ttrl-mask, random,
    entropy, prob, oracle (each of the last four also with ``-mask``), oracle-decay, care,
    care-regression, care-no-pseudo, care-no-stage2, care-no-aux, care-no-balance."""
    group_size: int = 8
    """G, rollouts per prompt. A batch with another G is rejected."""
    hidden_size: int | None = None
    """H of the hidden states. None: taken from the first batch that carries hidden states."""
    seed: int = 0
    """Seeds classifier init, replay sampling, Random's picks and the audit slice."""
    device: str = "cpu"
    """Where the classifiers live and the fused step runs (inputs are moved there)."""

    # --- budget --------------------------------------------------------------------------------
    budget_frac: float = 0.2
    """p: at most ceil(p * B) labels are paid per step (GT ignores it and buys all B); B counts
    distinct uids (``repeated_uids``)."""
    global_budget: int | None = None
    """Optional cap on labels paid over the whole run (all steps, all resumes). None = no cap."""
    audit_frac: float = 0.0
    """Share of each step's cap spent on a uniformly random audit slice (round(share * cap)
    prompts) that estimates pseudo-label accuracy without bias (``audit/*`` metrics). Audited
    prompts are bought like any other. 0 = paper parity (no audit)."""
    use_cached_labels: bool = True
    """A prompt whose label was bought at an earlier step trains on it for free (source CACHED).
    False: cached prompts are treated as TRUSTED/DROPPED like unlabelled ones, still never re-paid."""

    # --- CARE selection and weighting -----------------------------------------------------------
    alpha: float = 0.25
    """Stage-I gate: the top ceil(alpha * B) prompts by reliability are trusted (0.10 suggested
    for small models). The gate ranks only prompts without a known label."""
    warmup_steps: int = 20
    """The Stage-I gate is off for the first ``warmup_steps`` decide calls (step index <
    warmup_steps); the official code hard-codes 20 (steps 1..20 1-based)."""
    trust_weight: str = "reliability"
    """Advantage weight of a trusted (pseudo-labelled) prompt under CARE:
    'reliability' = the Stage-I score P(majority correct) (paper Eq. 7, default);
    'official' = clip(soft_adv * E[CAG], 0, 1) as in the official code (effectively 1)."""
    soft_adv: float = 1.0
    """Coefficient of the 'official' trust-weight rule."""
    buy_trusted_if_short: bool = True
    """If fewer than the cap non-trusted prompts exist, trusted ones are bought next (official)."""
    decay_lambda: float = 1.0
    """Oracle-decay: a non-bought prompt's weight is exp(-decay_lambda * true CAG)."""
    stage2_correct_majority: str = "class0"
    """Stage-II training on prompts whose majority is correct: 'class0' = included with count
    label 0 (official code, default); 'exclude' = Stage-II trains only on wrong-majority prompts
    (its classes then mean exactly "k correct outside a wrong majority")."""

    # --- advantage conventions (ARCHITECTURE.md §3) ------------------------------------------
    adv_eps: float = 1e-6
    adv_unbiased: bool = False
    """Group advantage of ``Decision.advantages``/``pseudo_adv``: (r - mean) / (std + adv_eps),
    population std by default (a host may use its own normalisation instead)."""
    cag_eps: float = 0.0
    cag_unbiased: bool = False
    """Advantage convention inside CAG (official: population std, no eps)."""
    max_len: float = 4000.0
    """Length normaliser of the Stage-I length feature (official: a literal 4000)."""

    # --- classifiers (§5) ---------------------------------------------------------------------
    prompt_dim: int = 128
    resp_hidden_dim: int = 64
    resp_out_dim: int = 512
    head_dim: int = 256
    aux_weight: float = 1.5
    """Weight of Stage-I's per-rollout correctness head in its loss (0 = no aux head)."""
    class_balance_power: float = 0.5
    """Class weights count^-power, normalised to mean 1 over present classes (0 = unweighted)."""
    class_weight_clip: tuple[float, float] = (0.25, 4.0)
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_steps: int = 3
    """Gradient steps per RL step, each on this step's labels plus a fresh replay draw."""
    replay_capacity: int = 2048
    """FIFO capacity of each stage's replay buffer."""
    replay_batch: int = 16
    """History samples drawn per gradient step (Stage-II: stratified by count label)."""
    train_on_cached: bool = True
    """Cached labels (bought at an earlier step, new rollouts now) also train the classifiers."""
    background_update: bool = False
    """``CareController.update`` trains the classifiers on a background thread and returns at
    once; the next call that needs them (``decide``, ``first_layer_projection``, ``state_dict`` /
    ``save``, ``load_state_dict``, ``wait_update``) waits for it first and re-raises its error.
    Same operations in the same order, so the same classifiers and decisions as the synchronous
    update; only the ``train/*`` metrics move: each ``update()`` returns those of the previous
    background update (``wait_update()`` returns the latest). The update's 3 gradient steps x 2
    classifiers cost several times a decide (bench/bench_step.py); in a training loop they then
    overlap the policy update and the next rollouts instead of stalling them."""
    background_release_threads: bool = True
    """With :attr:`background_update` on the CPU: ``update()`` first releases the calling thread's
    idle OpenMP workers (:func:`care_ext.threads.release_idle_threads`), so that the update
    thread's own parallel regions are not throttled by workers nobody uses (libgomp lets workers
    spin only while all docked ones fit the cores). On the 2-core VM the background update took
    108-113 ms without it against 57-65 ms synchronous (bench/RESULTS.md, fourteenth session).
    Same operations, so the same classifiers; off only for A/B runs."""
    first_layer_backward: str = "auto"
    """How classifier training runs the BatchNorm -> Linear first layers (their inputs are data):
    'fused' = one GEMM per backward (:mod:`care_ext.bn_linear`), 'split' = fused, and on the CPU
    the bf16 hidden states multiplied by bf16 pieces of the weights (forward) and of the output
    gradients (backward) in MKL's bf16 GEMM, without their float32 normalised copy (exact
    products, float32 sums; the batch mean is subtracted after the GEMM, so columns whose mean
    dwarfs their spread lose digits to cancellation, as the decide's folded weights do),
    'autograd' = separate ops, 'auto' = at widths >= 1024 (LLM hidden sizes) split on CPUs with
    bf16 units (:func:`care_ext.bf16_split.cpu_bf16_hardware`) and fused elsewhere, autograd
    below (the CPU lab, H = 128, keeps the float order its recorded numbers were made with).
    Same maths; the float32 rounding of the classifier weights differs between them. On the CPU,
    'fused' multiplies on care_ext's AVX2 GEMM where ``CARE_EXT_CPU_GEMM`` picks it
    (:func:`care_ext.ops.bn_linear_backward`)."""

    first_layer_gemm: str = "auto"
    """How the acquisition step multiplies bf16 hidden states by the classifiers' first layers:
    'float32' (converted states, float32 GEMMs), or 'bf16x3' / 'bf16x2': bf16 GEMMs with each
    float32 weight split into 3 bf16 pieces (float32-exact weights) or 2 (2^-16 relative);
    products exact, sums float32 (:mod:`care_ext.bf16_split`). On CUDA the fused step's
    tensor-core GEMMs; on the CPU MKL's bf16 GEMM (AMX / AVX512-BF16 Xeons; elsewhere float32
    GEMMs on converted copies, slower: ``care_ext.build_info()["cpu_bf16_gemm"]`` says which).
    'auto' (default): 'bf16x3' on a CPU with bf16 units at H >= 1024, 'float32' elsewhere
    (:func:`care_ext.bf16_split.resolve_first_layer_gemm`; on an H100 the core decided slower with
    the split than with float32). Used only where it applies: bf16 hidden states, raw (not
    projected) states, count classifiers; float32 elsewhere. bench/RESULTS.md has the CPU measurements.
    The trade of 'bf16x2', measured at 64x8x4096 on an AMX Xeon (eleventh session): the step on
    one core 2.9-3.0 against 3.4-3.7 ms for 'bf16x3' (5.5x against 4.4x the eager reference), its
    logits 1.8e-6 of the largest logit from a float64 step against 5.0e-7 for 'bf16x3' and
    6.6e-7 for 'float32' (``bench/step_precision.py``)."""

    first_layer_pack: str = "auto"
    """With split first layers on a CPU with AMX (``care_ext.build_info()["cpu_brgemm"]``): pack
    the bf16 pieces once per update for oneDNN's BRGeMM (:func:`care_ext.bf16_split.
    pack_first_layer_split`), so that the step's first-layer GEMMs skip MKL's re-packing of the
    weights at every call (and Stage-II's units skip the rows outside its mask). Same products,
    float32 sums in another order. With float32 first layers where the CPU step runs care_ext's
    AVX2 GEMM (:func:`care_ext.ops.cpu_step_packs_weights`): pack the step's float32 weights once
    per update for it (:func:`care_ext.ops.pack_cpu_step_weights`) instead of at every call; the
    same bits (at 64x8x4096 on 2 threads of a Zen 3 EPYC the step op took a median 0.87x its
    time and the decide after a background update 12.1 against 14.4 ms; nothing measurable at
    512x16x4096; bench/RESULTS.md, nineteenth session). 'on', 'off', or 'auto' (default): on with
    :attr:`background_update`, whose thread then does the packing, off otherwise. On 2 threads of
    an AMX Xeon (bench/RESULTS.md, tenth session) the decide after a background update took
    7.8-11.5 against 9.8-12.5 ms at 64x8x4096 and 33.7-35.2 against 40.4-42.3 ms at 512x16x4096;
    with a synchronous update the packing (~1-2 ms per update at H = 4096) lands on the next decide:
    12.6-12.8 against 10.6 ms at 64x8, 42-44 ms either way at 512x16. Controllers with many cores
    (small blocks: a 32-row block's step 0.75-0.87 against 1.08-1.17 ms) may want 'on';
    bench/gpu_check.sh measures it on the GPU host's 16 cores."""

    # --- inputs and monitoring ------------------------------------------------------------------
    nonfinite: str = "error"
    """NaN/Inf in hidden states, lengths or log-probs: 'error' (ValueError naming the rows) or
    'drop' (those prompts are DROPPED, never bought or trained on)."""
    repeated_uids: str = "share"
    """One prompt uid in several rows of a batch (several rollout groups of one prompt, e.g.
    from OpenRLHF's ``--data.prompt_probs`` blending, which repeats rows of the smaller
    datasets): 'share' decides each row on its own rollouts and features, but buys a uid at
    most once per step, and a label bought or cached for it serves every row of it. The
    per-step cap is then ceil(p * U) for the batch's U distinct uids, a uid ranks by its
    best-scoring row, and the audit slice draws uids. 'error': a ValueError naming the
    repeated uids (what care_ext did before 'share' existed)."""
    sim_metrics: bool = True
    """With a simulation oracle, also log ``sim/*`` metrics that read every prompt's gold."""
    sim_cag_recall_ties: str = "credit"
    """How ``sim/cag_recall`` treats prompts tied at the Oracle's k-th true CAG (often many at
    0: right majorities): 'credit' counts a bought tied prompt as the Oracle's while its top k
    has room for the tie (the overlap under the tie-break most favourable to the bought set;
    the same for any row order), 'index' breaks ties to the lower row index (releases before
    2026-11-27 and the lab numbers recorded with them; it depends on the batch order)."""

    extra: dict = field(default_factory=dict)
    """Free-form host data stored with the config (never read by the core)."""

    def __post_init__(self) -> None:
        self.class_weight_clip = tuple(self.class_weight_clip)
        for name, lo in _INT_MIN.items():
            v, optional = getattr(self, name), name in ("hidden_size", "global_budget")
            if v is None and optional:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (lo is not None and v < lo):
                raise ValueError(f"{name} must be an int{f' >= {lo}' if lo is not None else ''}"
                                 f"{' or None' if optional else ''}, got {v!r}")
        for name in _NONNEG_FLOAT:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in _BOOL:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        clip = self.class_weight_clip
        if (len(clip) != 2 or not all(isinstance(c, numbers.Real) and not isinstance(c, bool)
                                      and math.isfinite(c) for c in clip)
                or not 0 <= clip[0] <= clip[1]):
            raise ValueError(f"class_weight_clip must be (lo, hi) with 0 <= lo <= hi finite, got {clip!r}")
        for name in ("budget_frac", "alpha", "audit_frac"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        choices = {"trust_weight": ("reliability", "official"),
                   "stage2_correct_majority": ("class0", "exclude"),
                   "nonfinite": ("error", "drop"),
                   "repeated_uids": ("share", "error"),
                   "first_layer_backward": ("auto", "autograd", "fused", "split"),
                   "first_layer_gemm": ("auto", "float32", "bf16x3", "bf16x2"),
                   "first_layer_pack": ("auto", "on", "off"),
                   "sim_cag_recall_ties": ("credit", "index")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (math.isfinite(self.max_len) and self.max_len > 0):
            raise ValueError(f"max_len must be finite and > 0, got {self.max_len}")

    def step_cap(self, batch_size: int) -> int:
        """Per-step label cap ceil(p * B) for a batch of B distinct prompt uids."""
        return ceil_frac(self.budget_frac, batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CareConfig":
        return cls(**d)
