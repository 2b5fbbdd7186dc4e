"""Losses. Every collective of the project lives in this package (dist.py)."""
from trainer.losses.clip import clip_loss
from trainer.losses.objective import T3DLoss
from trainer.losses.sentence import sentence_loss
from trainer.losses.tma import consistency_loss, local_alignment_loss, token_region_similarity

__all__ = ["clip_loss", "sentence_loss", "local_alignment_loss", "consistency_loss", "token_region_similarity", "T3DLoss"]
