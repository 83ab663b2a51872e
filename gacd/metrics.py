"""Metric names, `split/name`, shared by training, the study and the analysis."""

EPOCH = "epoch"
LR = "lr"
EPOCH_SECONDS = "time/epoch_s"
TRAIN_LOSS_PREFIX = "train/loss"  # train/loss, train/loss/ce, train/loss/contrastive, ...

ATTACKS = ("clean", "fgsm", "pgd", "cw", "autoattack")


def accuracy(split: str, attack: str) -> str:
    """`val/pgd_acc`, `test/autoattack_acc`, ..."""
    return f"{split}/{attack}_acc"


def train_loss(term: str) -> str:
    return TRAIN_LOSS_PREFIX if term == "loss" else f"{TRAIN_LOSS_PREFIX}/{term}"


VAL_CLEAN_ACC = accuracy("val", "clean")
VAL_PGD_ACC = accuracy("val", "pgd")
