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
# How many validation images each epoch's accuracies were measured on (their standard error).
VAL_SAMPLES = "val/samples"

# Final runs report their test split twice: for the last epoch (`test/...`, `transfer/...`) and
# for the epoch with the best `SELECTION` on validation (`test_best/...`, `transfer_best/...`,
# and that epoch as `test_best/epoch`). Robust overfitting (Rice et al. 2020) makes the last
# epoch of adversarial training a poor choice; the best is never chosen on test.
SELECTION = VAL_PGD_ACC
BEST = "_best"


def best(name: str) -> str:
    """`test/pgd_acc` -> `test_best/pgd_acc`, `transfer/cw_acc` -> `transfer_best/cw_acc`."""
    split, _, rest = name.partition("/")
    return f"{split}{BEST}/{rest}"


BEST_EPOCH = best("test/epoch")


def structure(split: str, name: str) -> str:
    """`test/cka_clean`, `test/cka_adversarial`, `test/class_corr_diff`."""
    return f"{split}/{name}"


CKA_CLEAN = "cka_clean"
CKA_ADVERSARIAL = "cka_adversarial"
CLASS_CORR_DIFF = "class_corr_diff"
TEST_CKA_CLEAN = structure("test", CKA_CLEAN)
TEST_CKA_ADVERSARIAL = structure("test", CKA_ADVERSARIAL)
TEST_CLASS_CORR_DIFF = structure("test", CLASS_CORR_DIFF)

# Transfer across tasks: the frozen student with a linear probe, on the target's test split.
TRANSFER = "transfer"
TRANSFER_CLEAN_ACC = accuracy(TRANSFER, "clean")
TRANSFER_PGD_ACC = accuracy(TRANSFER, "pgd")
