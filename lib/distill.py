"""Knowledge distillation from the fp32 teacher (Hinton et al., 2015), per point for
segmentation: alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy."""
import torch
import torch.nn.functional as F

from lib.tasks import cross_entropy, loss_dtype, model_inputs


def distillation_loss(student_logits, teacher_logits, labels, temperature, alpha):
    """Logits (..., K), labels (...). The T^2 factor keeps the soft term's gradient scale
    independent of T."""
    k = student_logits.shape[-1]
    dtype = loss_dtype(student_logits)
    log_p_student = F.log_softmax(student_logits.reshape(-1, k).to(dtype) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, k).to(dtype) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return alpha * temperature ** 2 * kl + (1 - alpha) * cross_entropy(student_logits, labels)


class DistillLoss:
    """loss_fn(logits, batch) for the shared loop: runs the frozen teacher on the same batch."""

    def __init__(self, teacher, task, temperature, alpha):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.task, self.temperature, self.alpha = task, temperature, alpha

    def __call__(self, logits, batch):
        with torch.no_grad():
            teacher_logits = self.teacher(*model_inputs(batch, self.task))
        return distillation_loss(logits, teacher_logits, batch["label"], self.temperature,
                                 self.alpha)
