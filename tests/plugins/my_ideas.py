"""A researcher's own objective and method, as a plug-in file: each is one class, and nothing else in the workbench changes
(the tests train them through train(), papermill, nproc=2 and torchrun; nbs/14_extending.ipynb writes the same in cells)."""
import torch.nn.functional as F

from robustbench_lab.core import check
from robustbench_lab.methods import Method, register_method
from robustbench_lab.objectives import PGDAT, register_objective


@register_objective('pgdat_ls')
class LabelSmoothedPGDAT(PGDAT):
    "PGD-AT with label smoothing on the adversarial cross-entropy."
    def __init__(self, smoothing:float=0.1, # label smoothing of the adversarial CE
                 **kw):
        super().__init__(**kw)
        self.smoothing = check('smoothing', smoothing, float, lo=0, hi=1, hi_open=True)

    def loss(self, model, x, x_adv, y, model_adv=None):
        za = (model_adv or model)(x_adv)
        loss = F.cross_entropy(za, y, label_smoothing=self.smoothing)
        self.last_logits = dict(adv=za)
        return loss, dict(loss=loss.item())


@register_method('mixgrad')
class MixGrad(Method):
    "The gradient of w·CE(clean) + (1 − w)·(the objective's adversarial loss)."
    def __init__(self, objective, w:float=0.5, # weight of the clean cross-entropy
                ):
        super().__init__(objective)
        self.w = check('w', w, float, lo=0, hi=1)

    def compute_grads(self, model, x, y, backward):
        x_adv = self.perturb(model, x, y)
        model.train()
        adv, _ = self.objective.loss(model, x, x_adv, y)
        clean = F.cross_entropy(model(x), y)
        loss = self.w*clean + (1 - self.w)*adv
        backward(loss)
        return dict(loss=loss.item(), clean_ce=clean.item(), adv_loss=adv.item())
