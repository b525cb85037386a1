"""`--loop=torch`: PyTorch's `DistributedDataParallel` over the processes of a `torchrun`
launch (PyTorch backend), a runner of the controller.

`torchrun --nproc_per_node=N -m keras_preact.train.cifar ...` starts N processes; each
joins the process group (`start_processes`: NCCL on GPUs, gloo on CPUs), trains on its GPU
(`LOCAL_RANK`) and reads only its share of every global batch. The Keras model is wrapped
in `DistributedDataParallel`, as in Keras' guide to multi-GPU training with PyTorch: the
backward pass averages the gradients over the processes, and the Keras optimizer (the
trainer's SGD, schedule and weight decay) applies them on every process alike. BatchNorm
takes the statistics of the global batch (`global_batchnorm`), as one process and the other
backends do. Process 0 writes the run folder.
"""

import os

import numpy as np
import torch

from keras_preact.train import optimization, runners


def start_processes():
    """Joins the process group of a `torchrun` launch; returns `(processes, index)`."""
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size(), dist.get_rank()


def _device():
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_batchnorm(model):
    """Makes `model`'s BatchNorm layers take the mean and variance of the global batch: the
    sums over each process's share are all-reduced (with their gradients), as
    `torch.nn.SyncBatchNorm` does for torch's own layers."""
    import keras
    import torch.distributed as dist
    from torch.distributed.nn import functional as collective

    world = dist.get_world_size()

    def moments(layer):
        def global_moments(inputs, mask):
            if mask is not None:
                raise ValueError("Masked BatchNormalization is not synchronized.")
            axes = layer._reduction_axes
            x = inputs.float()
            count = x.numel() // np.prod([x.shape[a] for a in range(x.ndim) if a not in axes])
            sums = torch.stack([torch.sum(x, dim=axes), torch.sum(x * x, dim=axes)])
            sums = collective.all_reduce(sums)
            mean = sums[0] / (count * world)
            return mean.to(inputs.dtype), (sums[1] / (count * world) - mean**2).to(inputs.dtype)

        return global_moments

    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer._moments = moments(layer)


class TorchRunner(runners.Runner):
    """`--loop=torch`: a `DistributedDataParallel` step on each process of the group.

    Args:
        model: the model, compiled with its optimizer.
        label_smoothing: of the loss.
    """

    def __init__(self, model, *, label_smoothing=0.0):
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        self.model, self.dist, self.device = model, dist, _device()
        self.loss_fn = optimization.SparseCrossentropy(label_smoothing)
        self.eval_loss = optimization.SparseCrossentropy(label_smoothing, reduction=None)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def _tensors(self, x, y):
        return (torch.as_tensor(np.asarray(x), device=self.device),
                torch.as_tensor(np.asarray(y), device=self.device))  # fmt: skip

    def _step(self, x, y):
        """One step on this process's share: forward and backward through DDP (which
        averages the gradients over the processes), then the Keras optimizer."""
        variables = self.model.trainable_variables
        logits = self.ddp(x, training=True)
        loss = self.loss_fn(y, logits) + sum(self.model.losses, torch.zeros((), device=x.device))
        for v in variables:
            v.value.grad = None
        loss.backward()
        with torch.no_grad():
            self.model.optimizer.apply([v.value.grad for v in variables], variables)
        return torch.stack([loss.detach(), *_counts(logits.detach(), y)])

    def train(self, inputs, steps, *, stop, progress, every):
        """`steps` steps of `inputs`; see `runners`. After each step every process's stop
        wish is all-reduced (MAX): all stop after the same step."""
        world = self.dist.get_world_size()
        totals, done, wish = torch.zeros(3, device=self.device), 0, 0
        for x, y in runners.batches(inputs, steps):
            x, y = self._tensors(x, y)
            out = self._sum(self._step(x, y))  # the global batch's counts
            out[0] /= world  # the mean of the shares' mean losses: the global batch's
            totals += out
            done, batch = done + 1, len(y) * world
            if done % every == 0 or done == steps:
                progress(done, self._sums(totals, done, batch))
            if done < steps and (wish := self.agree(stop(done))):
                break
        return runners.Trained(done, self._sums(totals, done, batch) if done else {}, wish)

    @staticmethod
    def _sums(totals, steps, batch):
        loss, top1, top5 = (float(t) for t in totals)
        return {"loss": loss, "top1": top1, "top5": top5, "examples": float(steps * batch),
                "steps": steps}  # fmt: skip

    def _sum(self, tensor):
        self.dist.all_reduce(tensor)
        return tensor

    def evaluate(self, inputs):
        """Loss (with the weight-decay penalty), top-1, top-5 and the examples, summed over
        every process's share of every batch."""
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for x, y in runners.batches(inputs):
                x, y = self._tensors(x, y)
                if len(y):  # a share at the end of the data may be empty
                    logits = self.model(x, training=False)
                    losses = torch.sum(self.eval_loss(y, logits))
                    n = torch.tensor(float(len(y)), device=self.device)
                    totals += torch.stack([losses, *_counts(logits, y), n]).double()
        loss, top1, top5, n = (float(t) for t in self._sum(totals))
        penalty = sum(float(t) for t in self.model.losses)
        seen = max(n, 1.0)
        return {"loss": loss / seen + penalty, "top1": top1 / seen, "top5": top5 / seen,
                "examples": int(n)}  # fmt: skip

    def agree(self, wish):
        """The largest `wish` of every process."""
        value = torch.tensor([wish], device=self.device)
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MAX)
        return int(value.item())

    def gather(self, value):
        """Every process's `value`, in process order."""
        out = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(out, value)
        return out


def _counts(logits, labels):
    """Correct top-1 and top-k (k = min(5, classes)) predictions of a batch, as floats."""
    labels = labels.reshape(-1).long()
    top = torch.topk(logits.float(), min(5, logits.shape[-1]), dim=-1).indices
    return (torch.sum(top[:, 0] == labels).float(),
            torch.sum(torch.any(top == labels[:, None], -1)).float())  # fmt: skip
