"""The names of the step metrics: one constant each, shared by the trainer that writes them and
the progress bar, TUI charts and health rules that read them, so that a renamed metric fails
loudly (an import error, a test) instead of leaving an empty chart. TRL's names where TRL has
the metric. No MLX import here.
"""

REWARD = "reward"  # mean total reward of the step's completions (process rewards at their mean)
REWARD_STD = "reward_std"  # mean over groups of the in-group standard deviation
FRAC_REWARD_ZERO_STD = "frac_reward_zero_std"  # groups whose rewards are all equal: no signal
LOSS = "loss"
GRAD_NORM = "grad_norm"
LEARNING_RATE = "learning_rate"
KL = "kl"  # mean per-token KL to the reference; only with beta > 0
ENTROPY = "entropy"  # mean per-token entropy of the policy over the completion tokens
MEAN_LENGTH = "completions/mean_length"
MIN_LENGTH = "completions/min_length"
MAX_LENGTH = "completions/max_length"
CLIPPED_RATIO = "completions/clipped_ratio"  # completions cut at the length limit
CLIP_LOW = "clip_ratio/low_mean"
CLIP_HIGH = "clip_ratio/high_mean"
CLIP_REGION = "clip_ratio/region_mean"
CLIP_DELTA = "clip_ratio/delta_mean"
CLIP_LOW_MIN = "clip_ratio/low_min"  # the smallest per-sequence low-clip fraction
CLIP_HIGH_MAX = "clip_ratio/high_max"  # the largest per-sequence high-clip fraction
CISPO_CLIP = "cispo_clip_ratio"  # cispo: tokens whose weight hits the cap
VESPO_PHI = "vespo/phi_seq_mean"  # vespo: mean sequence weight
POLICY_LOSS = "policy_loss"  # the loss before the entropy bonus, when there is one
ENTROPY_COEF = "entropy_coef"  # the entropy bonus coefficient applied this step (adaptive: it moves)
ENTROPY_KEPT = "entropy_mask/kept_mean"  # top_entropy_quantile: share of tokens the loss acts on
OFF_POLICY_DROPPED = "off_policy_mask/dropped_mean"  # share of tokens in sequences the mask dropped
SAMPLING_LOGP_DIFF = "sampling/sampling_logp_difference/mean"  # |sampler - trainer| log-prob per token
IS_RATIO_MEAN = "sampling/importance_sampling_ratio/mean"  # the mismatch correction's mean weight
NUM_TOKENS = "num_tokens"  # completion tokens generated in the step
STEP_TIME = "step_time"  # seconds
TOKENS_PER_SECOND = "tokens_per_second"  # rollout throughput
PEAK_MEMORY_GB = "peak_memory_gb"  # mx.get_peak_memory() over the step
RESAMPLE_ROUNDS = "resample_rounds"  # dynamic sampling's extra rounds
SKIPPED = "skipped"  # 1 on a step whose update was not applied
JUDGE_TIME = "time/judge"  # seconds the judge reward spent (inside time/rewards)
JUDGE_UNPARSEABLE = "judge/unparseable"  # share of completions whose judgment could not be read
JUDGE_CACHE_HITS = "judge/cache_hits"  # judge requests answered from the run's cache
TOOL_CALLS = "tools/calls"  # tool calls per episode (multi-turn runs only)
TOOL_ERRORS = "tools/errors"  # calls per episode that failed (raised, timed out, unknown tool, unparseable)
TOOL_TURNS = "tools/turns"  # model turns per episode
TOOL_CUT = "tools/cut_at_max_turns"  # share of episodes ended by max_turns

REWARD_PREFIX = "rewards/"  # per reward function: rewards/<name>/mean and rewards/<name>/std


# the families of figures the trainer writes besides the constants above
OWN_PREFIXES = (REWARD_PREFIX, "time/", "sampling/", "clip_ratio/", "completions/", "entropy_mask/", "off_policy_mask/",
                "vespo/", "tools/")  # fmt: skip


def is_logged_by_user(metric: str) -> bool:
    """A figure a reward function logged with log_metric (TRL's name for it is the user's own)."""
    own = {v for k, v in globals().items() if k.isupper() and isinstance(v, str)}
    return metric not in own and not metric.startswith(OWN_PREFIXES)


def reward_mean(function: str) -> str:
    return f"{REWARD_PREFIX}{function}/mean"


def reward_std(function: str) -> str:
    return f"{REWARD_PREFIX}{function}/std"


def reward_function_of(metric: str) -> str | None:
    """'accuracy' for 'rewards/accuracy/mean'; None for any other metric."""
    if metric.startswith(REWARD_PREFIX) and metric.endswith("/mean"):
        return metric[len(REWARD_PREFIX) : -len("/mean")]
    return None


def time_of(phase: str) -> str:
    return f"time/{phase}"
