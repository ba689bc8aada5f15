"""The one place that declares every config key (with a comment), validates a config, and derives run sizes.

Experiment files in configs/ call `base()` and override; no other module reads a key that is not declared here.
Field names follow Marin/Levanter (LlamaConfig, SimpleTrainConfig, MuonConfig/AdamConfig) where they exist.
"""
from __future__ import annotations

import math
import os

import ml_collections as mlc
from ml_collections import config_dict

from tinyjax.errors import ConfigError  # noqa: F401 - config.ConfigError for the code that validates configs

# Marin's vocabulary: len(marin-tokenizer) = Llama-3 tokenizer (experiments/llama.py llama3_tokenizer_vocab_size).
MARIN_VOCAB_SIZE = 128_256
# Chinchilla: 20 training tokens per (nominal) parameter; Marin computes steps as 20·P_nominal // (batch·seq).
CHINCHILLA_TOKENS_PER_PARAM = 20

OPTIMIZERS = ("muon", "adamw")
SCHEDULES = ("linear", "cosine", "constant")
COEFFICIENT_TYPES = ("simple", "quintic", "polar_express", "aol")  # Levanter optim/util.py NEWTON_SCHULZ_COEFFICIENTS
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "block")
ATTENTION = ("auto", "reference", "blockwise", "splash", "pallas_gpu")  # = kernels.attention.IMPLEMENTATIONS
LOSS_IMPL = ("auto", "fused", "blockwise", "pallas_tpu", "pallas_gpu")  # = kernels.loss.IMPLEMENTATIONS
# model keys that change how the model is computed, not what it is: a run may resume with other values.
EXECUTION_ONLY_MODEL_KEYS = ("remat", "attention", "attention_block", "loss_block_size", "loss_impl",
                             "kernel_interpret", "init_from")


# Marin experiments/llama.py shapes: (hidden_dim, intermediate_dim, num_layers, num_heads, num_kv_heads, seq_len).
MARIN_MODELS = {
    "llama_nano": (32, 128, 2, 2, 2, 512),
    "llama_30m": (128, 448, 4, 2, 2, 1024),
    "llama_50m": (192, 448, 4, 2, 2, 1024),
    "llama_75m": (256, 896, 8, 4, 4, 1024),
    "llama_150m": (512, 1792, 6, 8, 8, 1024),
    "llama_300m": (768, 2688, 12, 12, 12, 1024),
}


def marin_model(cfg: mlc.ConfigDict, name: str) -> None:
  """Sets cfg.model's shape to Marin's `name` (experiments/llama.py), vocab 128,256, untied head."""
  m = cfg.model
  m.hidden_dim, m.intermediate_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.seq_len = MARIN_MODELS[name]
  m.vocab_size, m.tie_word_embeddings = MARIN_VOCAB_SIZE, False


def adamw_defaults(cfg: mlc.ConfigDict) -> None:
  """Sets cfg.optimizer to Levanter's AdamConfig defaults (the base defaults are MuonConfig's)."""
  o = cfg.optimizer
  o.name, o.learning_rate, o.weight_decay, o.nesterov = "adamw", 6e-4, 0.1, False
  o.beta1, o.beta2, o.epsilon, o.max_grad_norm = 0.9, 0.95, 1e-8, 1.0
  o.warmup, o.decay, o.min_lr_ratio, o.lr_schedule = 0.01, None, 0.1, "cosine"


def muon_speedrun(cfg: mlc.ConfigDict, learning_rate: float, adam_lr: float, weight_decay: float = 0.0,
                  warmup: float = 0.0) -> None:
  """cfg.optimizer as Marin's 2025 Muon speedruns set it (experiments/speedrun/llama_50m_muon_1x, muon_llama_scaling):
  Nesterov momentum 0.95, Adam betas 0.8/0.98 and eps 1e-15, Muon eps 1e-5, clip 1.0, constant then 80% linear decay
  to 0, the "simple" Newton-Schulz coefficients; the LRs, weight decay and warmup differ per run."""
  o = cfg.optimizer
  o.name, o.learning_rate, o.adam_lr = "muon", learning_rate, adam_lr
  o.momentum, o.nesterov = 0.95, True
  o.beta1, o.beta2, o.epsilon, o.muon_epsilon = 0.8, 0.98, 1e-15, 1e-5
  o.weight_decay, o.max_grad_norm = weight_decay, 1.0
  o.warmup, o.decay, o.min_lr_ratio, o.lr_schedule = warmup, 0.8, 0.0, "linear"
  o.coefficient_type = "simple"  # every 2025 Marin Muon run


def marin_speedrun(model: str, nominal_params: int, learning_rate: float, adam_lr: float, weight_decay: float = 0.0,
                   seq_len: int | None = None) -> mlc.ConfigDict:
  """A c4 config: Marin's `model` shape (seq_len replaced in the scaling sweeps), batch 128 at 1x Chinchilla of the
  nominal parameter count (steps = 20 * nominal // (128 * seq_len), as Marin computes them), Marin's Muon recipe, and
  Marin's speedrun data: the FineWeb-Edu 10B subcache (a prebuilt Levanter cache in Llama-3 ids, read as-is) with the
  marin tokenizer, evaluated on Paloma c4_en val as eval/paloma/c4_en/bpb."""
  c = base()
  marin_model(c, model)
  c.model.seq_len = seq_len or c.model.seq_len
  c.train.train_batch_size, c.train.chinchilla_multiple, c.train.nominal_params = 128, 1.0, nominal_params
  muon_speedrun(c, learning_rate, adam_lr, weight_decay)
  d = c.data
  d.tokenizer = "stanford-crfm/marin-tokenizer"  # = Llama-3 ids (128,256); the 10B cache was built with them
  d.train_urls = ["hf://datasets/marin-community/fineweb-edu-pretokenized-10B/train"]
  d.validation_urls = {"paloma/c4_en": ["hf://datasets/allenai/paloma@65cd6fc/c4_en/val/val*.jsonl.gz"]}
  return c


def base() -> mlc.ConfigDict:
  """Every key tinyjax reads, with its default. Defaults mirror Levanter's where a Levanter field exists."""
  c = mlc.ConfigDict()
  c.seed = 0  # model-init PRNG seed (Marin: trainer.seed = 0)

  c.model = m = mlc.ConfigDict()
  m.hidden_dim = 192  # d_model (Levanter LlamaConfig.hidden_dim)
  m.intermediate_dim = 448  # SwiGLU inner width
  m.num_layers = 4  # transformer blocks
  m.num_heads = 2  # query heads; head_dim = hidden_dim // num_heads
  m.num_kv_heads = 2  # key/value heads (GQA when < num_heads); must divide num_heads
  m.seq_len = 1024  # training/eval window length in tokens
  m.vocab_size = MARIN_VOCAB_SIZE  # embedding rows; must be >= the tokenizer's vocabulary
  m.tie_word_embeddings = False  # Levanter default: untied lm_head
  m.use_qk_norm = False  # RMSNorm on q and k per head (qwen3-style; for stability studies)
  m.layer_norm_epsilon = 1e-5  # RMSNorm eps (Levanter default)
  m.rope_theta = 10000.0  # RoPE base (Levanter DefaultRotaryEmbeddingsConfig)
  m.param_dtype = "float32"  # master weights (Marin jmp policy p=f32)
  m.compute_dtype = "bfloat16"  # matmul/activation dtype (Marin jmp policy c=bfloat16); loss is always fp32
  m.remat = "none"  # "none" | "block": rematerialise each block in the backward pass (Levanter: gradient_checkpointing)
  # Execution only (same parameters and math; may differ between a run and its resume). See kernels/attention.py.
  m.attention = "auto"  # "auto" | "reference" | "blockwise" | "splash" (TPU) | "pallas_gpu"; auto picks per platform
  m.attention_block = 512  # key-block length of the blockwise attention (memory O(seq_len x block) per head)
  m.loss_block_size = 2048  # tokens per lm_head + loss block (no [B, L, V] logits); 0 = unblocked (tests)
  # "fused": the lm_head's gradients formed blockwise in the forward pass (3 lm_head matmuls, as Marin credits);
  # "blockwise": a rematerialised scan that recomputes each block's logits in the backward (4; Levanter's blocking);
  # "pallas_tpu" / "pallas_gpu": Pallas kernels that keep the logits on chip (kernels/pallas_loss.py: 4 matmuls,
  # no [tokens, V] array in HBM); "auto": pallas_tpu on TPU, pallas_gpu on GPU, fused on CPU
  m.loss_impl = "auto"
  m.kernel_interpret = False  # run the Pallas loss kernels in interpret mode (any platform; correctness checks)
  m.init_from = ""  # "" = fresh init; else a HF Llama dir (weights.load_hf) whose weights start a fresh run

  c.optimizer = o = mlc.ConfigDict()
  o.name = "muon"  # "muon" (Levanter MuonConfig) | "adamw" (Levanter AdamConfig)
  o.learning_rate = 6e-4  # peak LR: Muon group for muon, all params for adamw (OptimizerConfig default)
  o.adam_lr = 6e-4  # muon only: peak LR of the Adam group (embedding, lm_head, norms)
  o.lr_scaling_base_batch = 0  # >0: scale both LRs by sqrt(train_batch_size / this) (sqrt batch-size rule); 0 = off
  o.momentum = 0.95  # muon: heavy-ball momentum (no dampening)
  o.nesterov = True  # muon: Nesterov momentum (MuonConfig default); adamw: NAdam update (use adamw_defaults)
  o.backend_steps = 5  # muon: Newton-Schulz iterations
  o.coefficient_type = "simple"  # muon NS: simple (2025 Marin runs) | quintic (Levanter default) | polar_express | aol
  o.muon_epsilon = 1e-8  # muon: X = u / (||u||_F + muon_epsilon)
  o.use_kimi_scaling = False  # muon: scale by 0.2*sqrt(max(out,in)) instead of sqrt(max(1,out/in))
  o.beta1 = 0.9  # Adam beta1 (adam group for muon)
  o.beta2 = 0.95  # Adam beta2
  o.epsilon = 1e-8  # Adam epsilon (added outside the sqrt)
  o.max_grad_norm = 1.0  # global-norm clip; muon: Adam group only (Levanter); 0 = no clipping
  o.weight_decay = 0.0  # decoupled, x lr; masked off for norms and the embedding (Levanter)
  o.adam_weight_decay = config_dict.placeholder(float)  # muon: Adam-group decay; None = weight_decay
  o.warmup = 0.01  # <= 1: fraction of steps; > 1: steps. Linear from 0 (Levanter)
  o.decay = config_dict.placeholder(float)  # <= 1: fraction; > 1: steps; None: every post-warmup step
  o.min_lr_ratio = 0.1  # final LR = peak * min_lr_ratio
  o.lr_schedule = "cosine"  # decay shape: "linear" | "cosine" | "constant"

  c.train = t = mlc.ConfigDict()
  t.train_batch_size = 128  # global batch in sequences
  t.num_train_steps = 0  # > 0: number of steps; 0: derive from chinchilla_multiple
  t.chinchilla_multiple = 1.0  # > 0 and num_train_steps == 0: steps = multiple*20*nominal_params // tokens_per_step
  t.nominal_params = 0  # parameter count the Chinchilla budget uses (Marin: 30e6/50e6/130e6...); 0 = model_size
  t.grad_accum_steps = 1  # microbatches per step (gradient accumulation); 0 = auto: the smallest that fits in memory
  t.device_memory_gb = 0.0  # memory of one device for the memory plan; 0 = from memory.DEVICE_MEMORY / the device
  t.memory_check = True  # compile the step before training and refuse (exit 2) a run whose plan does not fit
  t.plan_num_devices = 0  # --dry_run memory plan for this many data-parallel devices (16 = v5p-32); 0 = this mesh
  t.z_loss_weight = 0.0  # > 0: add weight * logsumexp(logits)^2 per token (Marin z_loss_weight)
  t.steps_per_eval = 1000  # eval every this many steps and at the end (Marin default 1000)
  t.max_eval_batches = 0  # cap on eval batches per set; 0 = all windows (Marin: None)
  t.eval_batch_size = 0  # 0 = train_batch_size (Marin's default)
  t.log_every = 10  # steps between metrics lines (the only host syncs in the loop)
  t.data_seed = 42  # shuffle seed of the training windows (Marin speedrun forces 42)
  t.skip_bad_steps = False  # non-finite loss/grad: False = stop the run; True = skip the update and count it (Marin)
  t.loss_spike_ratio = 3.0  # warn when loss > ratio x running mean of recent logged losses; 0 = off
  t.loss_spike_window = 20  # logged losses in the running mean of loss_spike_ratio
  t.dynamics_every = 0  # > 0: every this many steps, a separately compiled step also writes dynamics.jsonl; 0 = off
  t.dynamics_rows = 1  # rows of the batch whose activations / logits / attention logits the dynamics step measures
  t.tensorboard = True  # mirror metrics and dynamics to TensorBoard event files in workdir/tensorboard
  t.sample_prompts = ()  # after the run, print one sample per prompt and write workdir/samples.json (sample.py)
  t.wandb_project = ""  # "" = off; else log to this Weights & Biases project (pip install 'tinyjax[wandb]')
  # "START:STOP": trace steps START+1..STOP (jax.profiler, into workdir/profile) and print their measured time per
  # part of the model beside the roofline's bound (runtime/profile.py); "" or "0:0" = off
  t.profile_steps = ""

  c.checkpoint = k = mlc.ConfigDict()
  k.enabled = True  # save checkpoints (Orbax) in workdir/checkpoints and auto-resume from the latest
  k.save_interval_steps = 1000  # save every this many steps; 0 = no step-based saves
  k.save_interval_minutes = 10.0  # and every this many minutes (Marin: 10); 0 = no time-based saves
  k.max_to_keep = 2  # recent checkpoints kept
  k.keep_period = 0  # also keep forever every checkpoint at a multiple of this step (Marin steps_per_export); 0 = none
  k.async_save = True  # write in the background while training continues
  k.allow_config_change = False  # resume with changed optimizer/budget/batch/data keys (recorded); False = refuse
  k.start_over = False  # checkpoints exist but none restorable: False = refuse (exit 2); True = move aside, restart

  c.results = r = mlc.ConfigDict()  # the Marin speedrun_results.json run_info fields we cannot derive
  r.description = ""  # one sentence about the run (Marin SpeedrunConfig.description)
  r.author = ""  # Marin Author.name
  r.affiliation = ""  # Marin Author.affiliation
  r.url = ""  # Marin Author.url

  c.data = d = mlc.ConfigDict()
  # Sources: files (.jsonl/.json/.parquet/.txt, optionally .gz/.bz2/.xz; local, gs://, hf://; globs, {a,b}, {00..99})
  # or ONE prebuilt Levanter cache dir per split (any other URL, used as-is); "builtin:python-docs/..." is offline.
  d.train_urls = ["builtin:python-docs/train"]  # sources of training documents (Levanter train_urls)
  d.validation_urls = {"python_docs": ["builtin:python-docs/validation"]}  # eval-set name -> sources (eval/<name>/*)
  d.tokenizer = "builtin"  # "builtin" (BPE trained on the train split) | HF hub name | path to tokenizer.json (or dir)
  d.cache_dir = "~/.cache/tinyjax"  # root of token caches, tokenizers and mirrors of remote prebuilt caches
  d.text_key = "text"  # JSON field / parquet column holding a document's text (Levanter text_key)
  d.num_proc = 0  # processes tokenizing source files in parallel when building a cache; 0 = one per CPU core
  d.max_bad_fraction = 0.01  # a file with more unreadable records (bad JSON/UTF-8, no text) than this is an error
  d.num_workers = 0  # Grain worker processes (0 = in-process; order does not depend on it)

  c.mesh = mlc.ConfigDict()
  c.mesh.data = -1  # devices on the data axis; -1 = all devices
  c.mesh.fsdp = False  # also shard params and optimizer state over the data axis (ZeRO-3 style)

  c.distributed = dd = mlc.ConfigDict()  # several processes (hosts) in one run: see distributed.py
  dd.mode = "auto"  # "auto": start jax.distributed when SLURM/MPI/a TPU slice has > 1 process | "on" | "off"
  dd.coordinator_address = ""  # "host:port" of process 0 for clusters JAX cannot detect ("" = detect)
  dd.num_processes = 0  # with coordinator_address: processes in the run (0 = detect)
  dd.process_id = -1  # with coordinator_address: this process's index (-1 = detect)
  dd.initialization_timeout_s = 300  # seconds to wait for every process to join
  dd.heartbeat_timeout_s = 100  # JAX's heartbeat: a silent process is declared dead after this (others exit 4)
  dd.step_timeout_s = 1800.0  # exit 4 when no step (or final checkpoint wait) ends for this long: one stuck; 0 = off

  c.env = e = mlc.ConfigDict()  # applied by env.py before the JAX backend starts; None = leave the environment as is
  e.platform = config_dict.placeholder(str)  # JAX_PLATFORMS: "cpu", "cuda", "tpu", ...
  e.host_device_count = 0  # > 0: fake this many CPU devices (testing sharding on one host)
  e.xla_python_client_preallocate = config_dict.placeholder(str)  # "true" | "false": preallocate GPU memory
  e.xla_client_mem_fraction = config_dict.placeholder(str)  # e.g. "0.75": preallocated fraction of GPU memory
  e.xla_python_client_mem_fraction = config_dict.placeholder(str)  # deprecated spelling of the above; never both
  e.xla_python_client_allocator = config_dict.placeholder(str)  # "default" | "platform" | "bfc" | "cuda_async"
  e.tf_gpu_allocator = config_dict.placeholder(str)  # TF_GPU_ALLOCATOR, e.g. "cuda_malloc_async"
  e.xla_flags = ()  # extra XLA_FLAGS entries, e.g. ("--xla_gpu_enable_latency_hiding_scheduler=true",)
  e.libtpu_init_args = ()  # extra LIBTPU_INIT_ARGS entries (e.g. "--xla_tpu_scoped_vmem_limit_kib=98304" on v6e)
  e.gpu_deterministic = False  # GPU determinism: --xla_gpu_deterministic_ops=true (+ autotune off unless set below)
  e.gpu_autotune_level = -1  # --xla_gpu_autotune_level=N (0 = off ... 4 = default); -1 = leave
  e.jax_threefry_partitionable = True  # Levanter DEFAULT_JAX_CONFIG
  e.jax_softmax_custom_jvp = True  # Levanter DEFAULT_JAX_CONFIG
  e.jax_default_matmul_precision = config_dict.placeholder(str)  # "default" | "high" | "highest" (fp32 on TPU/GPU)
  e.jax_enable_x64 = False  # 64-bit types (changes numerics; off in Marin)
  e.compilation_cache_dir = config_dict.placeholder(str)  # persistent XLA compilation cache (Marin sets one)
  e.gc_policy = "default"  # Python GC in the loop: "default" | "freeze" (gc.freeze after setup) | "disable"
  return c


def profile_window(spec: str) -> tuple[int, int] | None:
  """train.profile_steps as (START, STOP), None when off ("" or "0:0"); ValueError unless 0 <= START < STOP."""
  if spec in ("", "0:0"):
    return None
  start, stop = (int(part) for part in spec.split(":"))  # ValueError: not two whole numbers
  if not 0 <= start < stop:
    raise ValueError(spec)
  return start, stop


def _fraction_or_steps(value: float, total: int) -> int:
  """Levanter _convert_frac_or_steps: <= 1 is a fraction of total, > 1 a step count."""
  return int(value * total) if value <= 1.0 else int(value)


def tokens_per_step(cfg) -> int:
  return cfg.train.train_batch_size * cfg.model.seq_len


def num_train_steps(cfg, model_size: int) -> int:
  """Explicit steps win; otherwise Marin's 20·P_nominal·multiple // (batch·seq)."""
  if cfg.train.num_train_steps > 0:
    return cfg.train.num_train_steps
  nominal = cfg.train.nominal_params or model_size
  return int(cfg.train.chinchilla_multiple * CHINCHILLA_TOKENS_PER_PARAM * nominal) // tokens_per_step(cfg)


def learning_rates(cfg) -> tuple[float, float]:
  """(learning_rate, adam_lr) after the optional sqrt batch-size rule."""
  o = cfg.optimizer
  scale = 1.0
  if o.lr_scaling_base_batch > 0:
    scale = math.sqrt(cfg.train.train_batch_size / o.lr_scaling_base_batch)
  return o.learning_rate * scale, o.adam_lr * scale


def warmup_steps(cfg, total: int) -> int:
  return _fraction_or_steps(cfg.optimizer.warmup, total)


def decay_steps(cfg, total: int) -> int:
  warm = warmup_steps(cfg, total)
  if cfg.optimizer.decay is None:
    return total - warm
  return _fraction_or_steps(cfg.optimizer.decay, total)


def _require(ok: bool, key: str, allowed: str, value) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r} is invalid: {allowed}")


def validate(cfg, num_devices: int | None = None) -> None:
  """Raises ConfigError naming the first bad key; num_devices enables the mesh/batch divisibility checks."""
  _validate_model(cfg.model)
  _validate_optimizer(cfg.optimizer)
  _validate_train(cfg.train)
  _validate_runtime(cfg)
  _validate_budget(cfg)
  if num_devices is not None:
    _validate_devices(cfg, num_devices)


def validate_platform(platform: str | None) -> None:
  """config.env.platform names backends JAX knows; checked before JAX loads its plugins, because libtpu and the CUDA
  plugin print lines of their own when loaded (absl's "All log messages before absl::InitializeLog()", "Could not
  find cuda drivers", ...), and a user mistake is one line. A name only an installed plugin registers (say a vendor's
  PJRT plugin) is looked up by loading the plugins with their output held back, and given back if it is known."""
  names = [p.strip() for p in (platform or "").split(",") if p.strip()]
  if not names:
    return
  from jax._src import xla_bridge  # noqa: PLC0415 - private, checked on jax 0.10.2: the registry JAX itself checks
  if set(names) <= xla_bridge.known_platforms():  # cpu, tpu, cuda, rocm, gpu, ... before any plugin is loaded
    return
  import tempfile  # noqa: PLC0415
  with tempfile.TemporaryFile() as held:
    saved = os.dup(2)
    os.dup2(held.fileno(), 2)
    try:
      xla_bridge._discover_and_register_pjrt_plugins()  # noqa: SLF001 - what the backend's start would do first
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    unknown = [n for n in names if n not in xla_bridge.known_platforms()]
    if not unknown:
      held.seek(0)
      os.write(2, held.read())
      return
  _require(False, "env.platform", f"allowed: {', '.join(sorted(xla_bridge.known_platforms()))}, or several in "
           f"order of preference separated by commas ({unknown[0]!r} is no backend JAX knows)", platform)


def _validate_model(m) -> None:
  for key in ("hidden_dim", "intermediate_dim", "num_layers", "num_heads", "num_kv_heads", "seq_len", "vocab_size"):
    _require(getattr(m, key) > 0, f"model.{key}", "must be a positive integer", getattr(m, key))
  _require(m.hidden_dim % m.num_heads == 0, "model.num_heads",
           f"must divide model.hidden_dim={m.hidden_dim}", m.num_heads)
  _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"must divide model.num_heads={m.num_heads}", m.num_kv_heads)
  _require(((m.hidden_dim // m.num_heads) % 2) == 0, "model.num_heads",
           "must leave an even head_dim (RoPE rotates pairs)", m.num_heads)
  _require(m.seq_len >= 2, "model.seq_len", "must be >= 2 (one input and one target)", m.seq_len)
  _require(m.layer_norm_epsilon > 0, "model.layer_norm_epsilon", "must be > 0", m.layer_norm_epsilon)
  _require(m.param_dtype in DTYPES, "model.param_dtype", f"allowed: {', '.join(DTYPES)}", m.param_dtype)
  _require(m.compute_dtype in DTYPES, "model.compute_dtype", f"allowed: {', '.join(DTYPES)}", m.compute_dtype)
  _require(m.remat in REMAT, "model.remat", f"allowed: {', '.join(REMAT)}", m.remat)
  _require(m.attention in ATTENTION, "model.attention", f"allowed: {', '.join(ATTENTION)}", m.attention)
  _require(m.attention != "splash" or m.seq_len % 128 == 0, "model.attention",
           f"splash needs model.seq_len to be a multiple of 128 (the TPU's lane width; it is {m.seq_len})", m.attention)
  _require(m.attention_block > 0, "model.attention_block", "must be a positive integer", m.attention_block)
  _require(m.loss_block_size >= 0, "model.loss_block_size", "must be >= 0 (0 = unblocked)", m.loss_block_size)
  _require(m.loss_impl in LOSS_IMPL, "model.loss_impl", f"allowed: {', '.join(LOSS_IMPL)}", m.loss_impl)


def _validate_optimizer(o) -> None:
  _require(o.name in OPTIMIZERS, "optimizer.name", f"allowed: {', '.join(OPTIMIZERS)}", o.name)
  _require(o.lr_schedule in SCHEDULES, "optimizer.lr_schedule", f"allowed: {', '.join(SCHEDULES)}", o.lr_schedule)
  _require(o.coefficient_type in COEFFICIENT_TYPES, "optimizer.coefficient_type",
           f"allowed: {', '.join(COEFFICIENT_TYPES)}", o.coefficient_type)
  for key in ("learning_rate", "adam_lr"):
    _require(getattr(o, key) > 0, f"optimizer.{key}", "must be > 0", getattr(o, key))
  for key in ("beta1", "beta2", "momentum"):
    _require(0 <= getattr(o, key) < 1, f"optimizer.{key}", "must be in [0, 1)", getattr(o, key))
  for key in ("epsilon", "muon_epsilon", "max_grad_norm", "weight_decay", "min_lr_ratio", "warmup",
              "lr_scaling_base_batch"):
    _require(getattr(o, key) >= 0, f"optimizer.{key}", "must be >= 0", getattr(o, key))
  _require(o.backend_steps > 0, "optimizer.backend_steps", "must be a positive integer", o.backend_steps)
  _require(o.decay is None or o.decay >= 0, "optimizer.decay", "must be >= 0 (or None)", o.decay)
  for key in ("warmup", "decay"):  # Levanter _convert_frac_or_steps: > 1 means a whole number of steps
    value = getattr(o, key)
    _require(value is None or value <= 1 or float(value).is_integer(), f"optimizer.{key}",
             "must be a fraction <= 1 or a whole number of steps", value)


def _validate_train(t) -> None:
  _require(t.train_batch_size > 0, "train.train_batch_size", "must be a positive integer", t.train_batch_size)
  _require(t.num_train_steps >= 0, "train.num_train_steps", "must be >= 0 (0 = use chinchilla_multiple)",
           t.num_train_steps)
  _require(t.num_train_steps > 0 or t.chinchilla_multiple > 0, "train.num_train_steps",
           "must be > 0 unless train.chinchilla_multiple > 0", t.num_train_steps)
  _require(t.chinchilla_multiple >= 0, "train.chinchilla_multiple", "must be >= 0", t.chinchilla_multiple)
  _require(t.grad_accum_steps >= 0, "train.grad_accum_steps", "must be >= 0 (0 = auto)", t.grad_accum_steps)
  _require(t.device_memory_gb >= 0, "train.device_memory_gb", "must be >= 0 (0 = known device table)",
           t.device_memory_gb)
  for key in ("steps_per_eval", "log_every"):
    _require(getattr(t, key) > 0, f"train.{key}", "must be a positive integer", getattr(t, key))
  for key in ("max_eval_batches", "eval_batch_size", "nominal_params", "plan_num_devices", "dynamics_every"):
    _require(getattr(t, key) >= 0, f"train.{key}", "must be >= 0 (0 = default)", getattr(t, key))
  _require(1 <= t.dynamics_rows <= t.train_batch_size, "train.dynamics_rows",
           f"must be in [1, train.train_batch_size={t.train_batch_size}]", t.dynamics_rows)
  _require(t.z_loss_weight >= 0, "train.z_loss_weight", "must be >= 0", t.z_loss_weight)
  try:
    profile_window(t.profile_steps)
  except ValueError:
    _require(False, "train.profile_steps", 'must be "START:STOP" with whole numbers 0 <= START < STOP (traces '
             'steps START+1..STOP), or "" / "0:0" (off)', t.profile_steps)


def _validate_runtime(cfg) -> None:
  """data, mesh, checkpoint, distributed, env, and the loss-spike keys."""
  t, d = cfg.train, cfg.data
  _require(len(d.train_urls) > 0, "data.train_urls", "must name at least one source", list(d.train_urls))
  # Refused, not supported: the cache dir holds what must be local (tokenizers being trained, caches being built
  # with file locks and renames, a gs:// workdir's local mirror); caches on GCS are read in place as sources.
  _require("://" not in d.cache_dir, "data.cache_dir",
           "must be a local directory (tokenizers, caches being built, the local mirror of a gs:// workdir); to "
           "train from token caches on GCS, build them once (python -m tinyjax.data), copy each cache folder to the "
           "bucket and name it in data.train_urls / data.validation_urls (read in place)", d.cache_dir)
  _require(d.num_workers >= 0, "data.num_workers", "must be >= 0", d.num_workers)
  _require(d.num_proc >= 0, "data.num_proc", "must be >= 0 (0 = one per CPU core)", d.num_proc)
  _require(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", "must be in [0, 1]", d.max_bad_fraction)
  _require(cfg.mesh.data == -1 or cfg.mesh.data > 0, "mesh.data", "must be -1 (all devices) or positive",
           cfg.mesh.data)
  k = cfg.checkpoint
  _require(k.max_to_keep >= 1, "checkpoint.max_to_keep", "must be >= 1 (0 would delete every checkpoint)",
           k.max_to_keep)
  for key in ("save_interval_steps", "save_interval_minutes", "keep_period"):
    _require(k[key] >= 0, f"checkpoint.{key}", "must be >= 0 (0 = off)", k[key])
  _require(t.loss_spike_window > 0, "train.loss_spike_window", "must be a positive integer", t.loss_spike_window)
  _require(t.loss_spike_ratio >= 0, "train.loss_spike_ratio", "must be >= 0 (0 = off)", t.loss_spike_ratio)
  dd = cfg.distributed
  _require(dd.mode in ("auto", "on", "off"), "distributed.mode", "allowed: auto, on, off", dd.mode)
  for key in ("num_processes", "initialization_timeout_s", "heartbeat_timeout_s", "step_timeout_s"):
    _require(dd[key] >= 0, f"distributed.{key}", "must be >= 0", dd[key])
  _require(dd.process_id >= -1, "distributed.process_id", "must be >= 0 (or -1 = detect)", dd.process_id)
  _require(cfg.env.host_device_count >= 0, "env.host_device_count", "must be >= 0", cfg.env.host_device_count)


def _validate_budget(cfg) -> None:
  """The run's length: steps from the budget, and warmup + decay inside them."""
  m, o, t = cfg.model, cfg.optimizer, cfg.train
  from tinyjax import flops, model  # late: keeps `import tinyjax.config` free of jax/flax for data worker processes
  steps = num_train_steps(cfg, flops.param_counts(model.ModelConfig.from_config(m))["model_size"])
  _require(steps > 0, "train.chinchilla_multiple", "gives 0 steps at this batch and seq_len", t.chinchilla_multiple)
  _require(warmup_steps(cfg, steps) <= steps, "optimizer.warmup", f"must fit in the {steps} training steps",
           o.warmup)
  _require(warmup_steps(cfg, steps) + decay_steps(cfg, steps) <= steps, "optimizer.decay",
           f"warmup + decay must fit in the {steps} training steps", o.decay)
  window = profile_window(t.profile_steps)
  _require(window is None or window[1] <= steps, "train.profile_steps",
           f"STOP must be <= the run's {steps} training steps", t.profile_steps)
  clash = _profile_clash(cfg, *window) if window else ""
  _require(not clash, "train.profile_steps", f"{clash}, which would count as the train step's "
           "time; choose a window without one", t.profile_steps)


def _profile_clash(cfg, start: int, stop: int) -> str:
  """What else would run inside a profile window (steps start+1..stop; an eval or save after step stop is outside)."""
  t, k = cfg.train, cfg.checkpoint
  for what, key, every, last in (("is a dynamics step", "train.dynamics_every", t.dynamics_every, stop),
                                 ("runs an eval", "train.steps_per_eval", t.steps_per_eval, stop - 1),
                                 ("saves a checkpoint", "checkpoint.save_interval_steps",
                                  k.save_interval_steps if k.enabled else 0, stop - 1)):
    n = (start // every + 1) * every if every else None
    if n is not None and n <= last:
      return f"step {n} {what} ({key}={every})"
  return ""


def _validate_devices(cfg, num_devices: int) -> None:
  t = cfg.train
  data = num_devices if cfg.mesh.data == -1 else cfg.mesh.data
  _require(data <= num_devices and num_devices % data == 0, "mesh.data",
           f"must divide the {num_devices} available devices", cfg.mesh.data)
  _require(t.train_batch_size % data == 0, "train.train_batch_size",
           f"must be divisible by the data-parallel size {data}", t.train_batch_size)
  _require((t.train_batch_size // data) % max(t.grad_accum_steps, 1) == 0, "train.grad_accum_steps",
           f"must divide the per-device batch {t.train_batch_size // data}", t.grad_accum_steps)
  eval_bs = t.eval_batch_size or t.train_batch_size
  _require(eval_bs % data == 0, "train.eval_batch_size",
           f"must be divisible by the data-parallel size {data}", eval_bs)
