"""Training: optimizers (AdamW, Muon, MuonClip), the Trainer loop, checkpoints, schedules.

    from moonlet.train.trainer import Trainer, TrainArgs
    from moonlet.train.optim import build_optimizer, QKClip, newton_schulz5
    from moonlet.train.checkpoint import resolve_checkpoint, save_checkpoint, load_model
    from moonlet.train.run import run_training          # what `moonlet train` / `moonlet sft` call
"""
