"""Assemble a training run from options: tokenizer, data, model, loaders, Trainer. Used by
`moonlet train`, `moonlet sft` and `moonlet demo` (and by torchrun launches, through `make_runtime`).

Options are a flat dict (the CLI flags, underscored); `TRAIN_DEFAULTS` / `SFT_DEFAULTS` fill the
rest. Resuming reads the run's saved options back from the checkpoint's train_args.json; only the
options in `RESUME_OVERRIDABLE` may change on resume (the others decide the data order or the model).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import ConfigError, ModelConfig, resolve_config
from ..data.corpus import (BUNDLED, bundled_documents, read_chat_documents, read_text_documents,
                           train_val_split)
from ..data.loader import ChatLoader, PackedTextLoader, TokenStream
from ..data.tokenizer import Tokenizer, train_tokenizer
from ..model import CausalLM
from ..model.sparse_attention import freeze_all_but_indexer, set_dsa_stage
from .checkpoint import list_checkpoints, load_model, load_train_args, resolve_checkpoint
from .runtime import Runtime, launch_world_size
from .trainer import TrainArgs, Trainer

TRAIN_DEFAULTS: dict = dict(
    model="tiny", data=None, val_data=None, val_fraction=0.02, tokenizer=None, vocab_size=None, init=None,
    resume=None, set=[], device="cpu", dp_shard=None, ep=1, activation_checkpointing=False, dsa_stage=None,
    **asdict(TrainArgs()),
)
SFT_DEFAULTS: dict = dict(TRAIN_DEFAULTS, model=None, lr=1e-3, steps=300, warmup_steps=20, eval_interval=50,
                          min_lr_ratio=0.0, val_fraction=0.05)
DSA_TRAIN_STAGES = ("warmup", "sparse")
RESUME_OVERRIDABLE = {"steps", "max_time", "eval_interval", "eval_batches", "log_interval", "save_interval",
                      "keep_last", "resume", "device", "max_nonfinite", "out", "lr", "init", "tokenizer",
                      "dp_shard", "ep", "activation_checkpointing"}


def make_runtime(opts: dict) -> Runtime:
    """The process topology: one process, or under torchrun (or with --dp-shard/--ep) moonlet.dist's
    sharded runtime (FSDP2 + expert parallelism)."""
    device = opts.get("device", "cpu")
    dp_shard, ep = opts.get("dp_shard"), opts.get("ep")
    ep = 1 if ep is None else ep
    if launch_world_size() > 1 or dp_shard not in (None, 1) or ep != 1:
        from ..dist.runtime import DistRuntime

        return DistRuntime(device, dp_shard, ep, precision=opts.get("precision", "fp32"),
                           activation_checkpointing=bool(opts.get("activation_checkpointing")))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Runtime(device, activation_checkpointing=bool(opts.get("activation_checkpointing")))


def _resume_batch_size(given: dict, saved: dict) -> None:
    """The global batch (rows per step = batch_size x processes) decides the data order, so it cannot
    change on resume; the number of processes can. Without -b, a different process count gets the
    per-process batch that keeps the global one; with -b, the global batch is checked."""
    world, saved_world = launch_world_size(), int(saved.get("world_size", 1))
    if "batch_size" not in saved:
        return
    global_b = saved["batch_size"] * saved_world
    if "batch_size" not in given:
        if world != saved_world:
            if global_b % world:
                raise ValueError(f"the run's global batch ({global_b} rows: --batch-size {saved['batch_size']} x "
                                 f"{saved_world} processes) is not divisible by {world} processes")
            given["batch_size"] = saved["batch_size"] = global_b // world
        return
    if given["batch_size"] * world != global_b:
        raise ValueError(f"--batch-size {given['batch_size']} x {world} processes = {given['batch_size'] * world} rows "
                         f"per step, but the run used {global_b} ({saved['batch_size']} x {saved_world}); the global "
                         f"batch cannot change when resuming")
    saved["batch_size"] = given["batch_size"]


def resolve_options(given: dict, mode: str) -> tuple[dict, Path | None]:
    """Defaults + saved run options (on resume) + the options given. Returns (options, checkpoint to resume)."""
    defaults = SFT_DEFAULTS if mode == "sft" else TRAIN_DEFAULTS
    given = dict(given)
    for k in ("data", "val_data"):  # compared with the saved run's on resume, so make them absolute
        if given.get(k) is not None:
            given[k] = _abs(given[k])
    opts = dict(defaults)
    ckpt = None
    out = given.get("out")
    if given.get("resume") is not None:
        target = given["resume"] if given["resume"] not in ("", True, "latest") else out
        if target is None:
            raise ValueError("--resume needs a run directory: pass --out RUN_DIR or --resume PATH")
        ckpt = resolve_checkpoint(target)
        saved = load_train_args(ckpt).get("options", {})
        if saved.get("mode", mode) != mode:
            raise ValueError(f"{ckpt} is a {saved.get('mode')} run; resume it with `moonlet {saved.get('mode')}`")
        _resume_batch_size(given, saved)
        if int(saved.get("world_size", 1)) != launch_world_size():  # a new process count: a new default layout
            saved = {k: v for k, v in saved.items() if k not in ("dp_shard", "ep")}
        opts.update({k: v for k, v in saved.items() if k in defaults or k in ("out", "mode")})
        for k, v in given.items():
            if k in RESUME_OVERRIDABLE:
                continue
            if k in saved and saved[k] != v:
                raise ValueError(f"--{k.replace('_', '-')} cannot change when resuming (the run used {saved[k]!r}, "
                                 f"got {v!r}); start a new run with --init {ckpt} instead")
        if out is None:
            out = saved.get("out") or str(ckpt.parent.parent)
    opts.update(given)
    opts["out"] = out
    opts["mode"] = mode
    if opts["out"] is None:
        raise ValueError("--out RUN_DIR is required")
    TrainArgs.from_dict(opts).validate()
    return opts, ckpt


# ---- pieces ------------------------------------------------------------------------------------------------
def _abs(paths):
    return None if paths is None else [str(Path(p).resolve()) for p in paths]


def _fingerprint(tokenizer: Tokenizer, paths: list[str] | None, extra: str) -> str:
    h = hashlib.sha256(tokenizer._tok.to_str().encode())
    for p in paths or [str(BUNDLED)]:
        st = os.stat(p)
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def text_documents(opts: dict) -> tuple[list[str], list[str]]:
    """(train, val) documents: the bundled corpus' split, or the user's files (+ --val-data or a split)."""
    if opts["data"] is None:
        train = bundled_documents("train")
        val = bundled_documents("val") if opts["val_data"] is None else read_text_documents(opts["val_data"])
        return train, val
    docs = read_text_documents(opts["data"])
    if not docs:
        raise ValueError(f"no text found in {opts['data']}")
    if opts["val_data"] is not None:
        return docs, read_text_documents(opts["val_data"])
    return train_val_split(docs, opts["val_fraction"], opts["seed"])


def token_streams(tokenizer: Tokenizer, opts: dict, run_dir: Path, print_fn) -> tuple[TokenStream, TokenStream]:
    """Tokenised train/val streams, cached in RUN_DIR/data/ (keyed by tokenizer and files)."""
    key = _fingerprint(tokenizer, (opts["data"] or []) + (opts["val_data"] or []) or None,
                       f"{opts['val_fraction']}:{opts['seed']}")
    cache = run_dir / "data"
    paths = {s: cache / f"{s}-{key}.npz" for s in ("train", "val")}
    if all(p.exists() for p in paths.values()):
        return TokenStream.load(paths["train"]), TokenStream.load(paths["val"])
    train_docs, val_docs = text_documents(opts)
    print_fn(f"tokenizing {len(train_docs)} train / {len(val_docs)} val documents "
             f"({sum(map(len, train_docs)) / 1e6:.1f}M / {sum(map(len, val_docs)) / 1e6:.2f}M characters)")
    streams = TokenStream.from_documents(tokenizer, train_docs), TokenStream.from_documents(tokenizer, val_docs)
    cache.mkdir(parents=True, exist_ok=True)
    for s, stream in zip(("train", "val"), streams):
        tmp = paths[s].with_name(paths[s].stem + ".tmp.npz")
        stream.save(tmp)
        os.replace(tmp, paths[s])
    return streams


def get_tokenizer(opts: dict, ckpt: Path | None, init: Path | None, run_dir: Path, print_fn) -> Tokenizer:
    if ckpt is not None and (ckpt / "tokenizer.json").exists():  # resuming: the run's own tokenizer
        return Tokenizer.from_file(ckpt)
    if opts["tokenizer"] is not None:
        return Tokenizer.from_file(opts["tokenizer"])
    if init is not None and (init / "tokenizer.json").exists():
        return Tokenizer.from_file(init)
    if init is not None:
        raise ValueError(f"{init} has no tokenizer.json; pass --tokenizer PATH (the tokenizer the model was trained with)")
    if opts["mode"] == "sft":
        raise ValueError("SFT needs the model's tokenizer: pass --init CHECKPOINT (with tokenizer.json) or --tokenizer")
    own = run_dir / "tokenizer"
    if (own / "tokenizer.json").exists():
        return Tokenizer.from_file(own)
    vocab = opts["vocab_size"] or resolve_config(opts["model"]).vocab_size
    docs, _ = text_documents(opts)
    print_fn(f"training a {vocab}-token byte-level BPE on {sum(map(len, docs)) / 1e6:.1f}M characters -> {own}")
    tok = train_tokenizer(docs, vocab_size=vocab)
    tok.save(own)
    return tok


def parse_overrides(items: list[str]) -> dict:
    """["hidden_size=256", "n_group=1"] -> {"hidden_size": 256, "n_group": 1} (values parsed as JSON)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def build_config(opts: dict, tokenizer: Tokenizer) -> ModelConfig:
    cfg = resolve_config(opts["model"])
    changes = parse_overrides(opts["set"])
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(f"--set: unknown config field {unknown[0]!r}")
    changes.update(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id)
    cfg = cfg.replace(**changes)
    if opts["seq_len"] > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {opts['seq_len']} exceeds the model's max_position_embeddings "
                          f"({cfg.max_position_embeddings})")
    return cfg


def _check_vocab(model: CausalLM, tokenizer: Tokenizer, where) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model in {where} only "
                         f"{model.config.vocab_size} embeddings; use the tokenizer the model was trained with")


def training_stage(model: CausalLM, opts: dict) -> tuple[dict, dict]:
    """Stage-specific training setup: (extra_losses, forward_kwargs) for the Trainer, after freezing
    whatever the stage does not train (the optimizer only sees requires_grad parameters).

    Plain pretraining/SFT: nothing. A DSA model (model_type deepseek_v32) trains in one of DSA's
    stages (V3.2 paper, section 2.1.1), "sparse" unless --dsa-stage says otherwise:
    - "warmup": dense attention; only the lightning indexers train, on the KL to the main attention;
    - "sparse": top-k attention; everything trains, the indexers on their KL (restricted to the
      selected keys), the rest on the LM loss (the indexer reads detached inputs, so the two never mix).
    """
    stage = opts.get("dsa_stage")
    if not model.config.is_dsa:
        if stage is not None:
            raise ValueError(f"--dsa-stage {stage} needs a DSA model; turn DSA on with --set model_type=deepseek_v32 "
                             f"index_n_heads=H index_head_dim=D index_topk=K (with --init CKPT to start from a "
                             f"dense checkpoint)")
        return {}, {}
    stage = stage or "sparse"
    if stage not in DSA_TRAIN_STAGES:
        raise ValueError(f"--dsa-stage must be one of {DSA_TRAIN_STAGES}, got {stage!r}")
    set_dsa_stage(model, stage)
    if stage == "warmup":
        freeze_all_but_indexer(model)
    return {"indexer": lambda out, batch: out.indexer_loss}, {}


def _check_dsa_stage(opts: dict, source: Path | None) -> None:
    """--dsa-stage on a model that will not have DSA fails before any tokenizing or training."""
    stage = opts.get("dsa_stage")
    if stage is None:
        return
    if stage not in DSA_TRAIN_STAGES:
        raise ValueError(f"--dsa-stage must be one of {DSA_TRAIN_STAGES}, got {stage!r}")
    base = resolve_config(str(source) if source is not None else opts["model"]).model_type
    model_type = parse_overrides(opts.get("set")).get("model_type", base)
    if model_type != "deepseek_v32":
        raise ValueError(f"--dsa-stage {stage} needs a DSA model; turn DSA on with --set model_type=deepseek_v32 "
                         f"index_n_heads=H index_head_dim=D index_topk=K (with --init CKPT to start from a "
                         f"dense checkpoint)")


def warmup_overrides(opts: dict, say) -> dict:
    """The dense warm-up leaves everything but the indexers untouched: no expert-bias updates and no
    QK-clip (which rewrites the frozen attention weights); MuonClip becomes plain Muon."""
    if opts.get("dsa_stage") != "warmup":
        return opts
    opts = dict(opts, bias_update_gamma=0.0)
    if opts["optimizer"] == "muonclip":
        opts["optimizer"] = "muon"
    say(f"DSA warm-up: training only the lightning indexers (optimizer {opts['optimizer']}, "
        f"no expert-bias update, no QK-clip)")
    return opts


def model_from_init(init: Path, changes: dict, seed: int, say) -> CausalLM:
    """The --init checkpoint's model, with --set applied: fields that only add modules (DSA's
    indexers via model_type deepseek_v32, ...) or change no shape may change; new tensors start
    from the usual initialisation, every loaded one keeps its value."""
    base = load_model(init)
    if not changes:
        return base
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(f"--set: unknown config field {unknown[0]!r}")
    model = CausalLM(base.config.replace(**changes)).init_weights(seed=seed)
    own, loaded = model.state_dict(), base.state_dict()
    for k, v in loaded.items():
        if k not in own:
            raise ConfigError(f"--set {' '.join(f'{a}={b}' for a, b in changes.items())}: {init} has {k}, which the "
                              f"changed model does not; only options that add modules can change with --init")
        if own[k].shape != v.shape:
            raise ConfigError(f"--set changes the shape of {k} ({tuple(v.shape)} -> {tuple(own[k].shape)}); "
                              f"only options that add modules or keep shapes can change with --init")
    missing = model.load_state_dict(loaded, strict=False).missing_keys
    if missing:
        say(f"--init {init}: {len(missing)} new tensors start from scratch "
            f"({sum(own[k].numel() for k in missing):,} values, e.g. {missing[0]})")
    return model


# ---- the run ----------------------------------------------------------------------------------------------
def run_training(given: dict, mode: str = "pretrain", print_fn: Callable[[str], None] = print,
                 progress: bool | None = None) -> dict:
    """Train (mode "pretrain") or fine-tune on chat data (mode "sft") as the options say; returns the
    trainer's summary plus "run_dir"."""
    opts, ckpt = resolve_options(given, mode)
    runtime = make_runtime(opts)
    say = print_fn if runtime.is_main else (lambda *_: None)
    run_dir = Path(opts["out"])
    if ckpt is None and list_checkpoints(run_dir):
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue that run or choose another --out")
    if mode == "sft" and opts["init"] is None and ckpt is None:
        raise ValueError("moonlet sft needs --init CHECKPOINT_OR_RUN_DIR (the model to fine-tune)")
    init = resolve_checkpoint(opts["init"]) if opts["init"] is not None and ckpt is None else None
    _check_dsa_stage(opts, ckpt or init)
    run_dir.mkdir(parents=True, exist_ok=True)
    opts = warmup_overrides(opts, say)
    args = TrainArgs.from_dict(opts)
    torch.manual_seed(args.seed)

    with runtime.main_first():  # rank 0 trains/saves the tokenizer and writes the token caches first
        tokenizer = get_tokenizer(opts, ckpt, init, run_dir, say)
        streams = token_streams(tokenizer, opts, run_dir, say) if mode != "sft" else None
    if ckpt is not None:
        model = runtime.load_model(ckpt, resume=True)
        _check_vocab(model, tokenizer, ckpt)
    elif init is not None:
        model = model_from_init(init, parse_overrides(opts.get("set")), args.seed, say)
        _check_vocab(model, tokenizer, init)
    else:
        model = CausalLM(build_config(opts, tokenizer)).init_weights(seed=args.seed)
    model = model.float().train()
    depth = model.config.num_nextn_predict_layers
    shard = dict(seed=args.seed, rank=runtime.rank, world_size=runtime.world_size, mtp_depth=depth)

    if mode == "sft":
        convs = read_chat_documents(opts["data"]) if opts["data"] else None
        if convs is None:
            raise ValueError("moonlet sft needs --data CHAT.jsonl")
        if opts["val_data"] is not None:
            val_convs = read_chat_documents(opts["val_data"])
        else:
            convs, val_convs = train_val_split(convs, opts["val_fraction"], args.seed)
        enc = [tokenizer.encode_chat(c) for c in convs]
        val_enc = [tokenizer.encode_chat(c) for c in val_convs]
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        train_loader = ChatLoader(enc, pad, args.batch_size, args.seq_len, **shard)
        val_loader = ChatLoader(val_enc, pad, args.batch_size, args.seq_len, **dict(shard, shuffle=False))
        say(f"SFT data: {len(enc)} train / {len(val_enc)} val conversations, "
            f"{train_loader.num_rows(0)} packed rows of {args.seq_len + 1} tokens, "
            f"{100 * train_loader.assistant_fraction:.0f}% of tokens are the assistant's (the loss covers only those)")
    else:
        train_stream, val_stream = streams
        train_loader = PackedTextLoader(train_stream, args.batch_size, args.seq_len, **shard)
        val_loader = PackedTextLoader(val_stream, args.batch_size, args.seq_len, **dict(shard, shuffle=False))
        say(f"data: {len(train_stream):,} train / {len(val_stream):,} val tokens; "
            f"{train_loader.num_rows(0) // (train_loader.global_batch * args.grad_accum)} steps per epoch "
            f"at {args.batch_size * args.grad_accum * runtime.world_size} x {args.seq_len} tokens per step")
    if runtime.world_size > 1:
        if val_loader.num_rows(0) < runtime.world_size:  # a rank without a validation row would stall the others
            raise ValueError(f"the validation data gives {val_loader.num_rows(0)} rows of {args.seq_len + 1} tokens, "
                             f"fewer than the {runtime.world_size} processes; use more validation data")
        say(f"distributed: {runtime.describe()}, {args.batch_size} rows per process")

    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {opts.get('model') or (ckpt or init)} ({n_params / 1e6:.2f}M parameters), optimizer {args.optimizer}, "
        f"lr {args.lr:g} ({args.schedule}), {args.steps} steps, run dir {run_dir}")
    info = {"options": {**opts, "data": _abs(opts["data"]), "val_data": _abs(opts["val_data"]),
                        "init": str(init) if init else opts.get("init"), "out": str(run_dir),
                        "world_size": runtime.world_size},
            "moonlet_version": __version__, "command": sys.argv}
    extra_losses, forward_kwargs = training_stage(model, opts)
    trainer = Trainer(model, args, train_loader, val_loader, run_dir=run_dir, tokenizer=tokenizer, runtime=runtime,
                      run_info=info, extra_losses=extra_losses, forward_kwargs=forward_kwargs, progress=progress,
                      print_fn=say)
    if ckpt is not None:
        trainer.resume(ckpt)
        say(f"resumed from {ckpt} at step {trainer.step}")
    summary = trainer.fit()
    if runtime.is_main:
        try:
            from .plot import plot_run

            summary["plot"] = str(plot_run(run_dir))
        except Exception as e:  # a plot must never lose a finished run
            say(f"(could not draw the loss curve: {e})")
    summary["run_dir"] = str(run_dir)
    summary["trainer"] = trainer
    summary["is_main"] = runtime.is_main
    runtime.close()
    return summary
