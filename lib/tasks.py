"""What differs between the three tasks when a batch meets a model: which tensors go in, and
how logits meet labels in the loss. Everything else in the loop is shared."""
import torch
import torch.nn.functional as F

TASKS = ("partseg", "semseg", "cls")


def model_inputs(batch, task):
    """Positional inputs of the model for a batch (part segmentation also takes the category)."""
    inputs = (batch["xyz"], batch["feat"])
    return inputs + (batch["category"],) if task == "partseg" else inputs


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def loss_dtype(logits):
    """The dtype losses are computed in: float32 at least (logits are bf16 under autocast),
    float64 kept."""
    return torch.promote_types(logits.dtype, torch.float32)


def cross_entropy(logits, labels):
    """Mean cross-entropy over points (segmentation, logits (B, N, K)) or shapes (cls, (B, K))."""
    logits = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits.to(loss_dtype(logits)), labels.reshape(-1))


def supervised_loss(logits, batch):
    """The plain training loss: cross-entropy against the batch's labels."""
    return cross_entropy(logits, batch["label"])
