"""Local teachers: a white-box model, and any model exposed as a black box with a query budget.

Also networks whose layers cannot be read: ``OpaqueModel`` refuses feature access with a
one-line error; ``ScriptedModel`` (TorchScript) and ``OnnxModel`` (onnxruntime) run files, and
can map the run's normalised batch back to pixels in [0, 1]; ``OpaqueBlackBoxTeacher`` answers
only probabilities or labels, its ``.model`` view revealing no more and charging the same budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distillkit.errors import ConfigError
from distillkit.teachers.base import BudgetExceededError, TeacherOutput


class LocalTeacher(nn.Module):
    """A white-box teacher: always in eval mode, never tracks gradients, returns logits."""

    kind = "white-box"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.queries = 0
        self.budget: int | None = None
        self.train(False)

    def train(self, mode: bool = True) -> LocalTeacher:
        """Stay in eval mode whatever the caller asks: BN statistics must not drift."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """Logits of the wrapped model."""
        self.queries += x.shape[0]
        return TeacherOutput(logits=self.model(x))


class BlackBoxTeacher(nn.Module):
    """Any local model seen only through probabilities ('soft') or labels ('hard'), with a budget."""

    def __init__(self, model: nn.Module, kind: str = "soft", budget: int | None = None):
        super().__init__()
        if kind not in ("soft", "hard"):
            raise ValueError(f"black-box teacher kind must be 'soft' or 'hard', got {kind!r}")
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}")
        self.inner = LocalTeacher(model)
        self.kind = kind
        self.budget = budget
        self.queries = 0
        self.train(False)

    def train(self, mode: bool = True) -> BlackBoxTeacher:
        """Stay in eval mode."""
        super().train(False)
        return self

    @property
    def remaining(self) -> int | None:
        """Queries left before the budget is spent (None: unlimited)."""
        return None if self.budget is None else self.budget - self.queries

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """Probabilities or labels; refuses a batch that would exceed the budget."""
        n = x.shape[0]
        if self.budget is not None and self.queries + n > self.budget:
            raise BudgetExceededError(
                f"query budget exceeded: {self.queries} used + {n} asked > budget {self.budget}"
            )
        self.queries += n
        logits = self.inner(x).logits
        if self.kind == "soft":
            return TeacherOutput(probs=torch.softmax(logits.float(), dim=1))
        return TeacherOutput(labels=logits.argmax(dim=1))


class OpaqueModel(nn.Module):
    """A teacher network whose layers cannot be read: feature methods get a one-line error."""

    def __init__(
        self,
        source: str,
        what: str,
        hint: str = "give the teacher as teacher_model=... with teacher_weights=...",
    ):
        super().__init__()
        self.source = source
        self.what = what
        self.hint = hint

    def _refuse(self) -> ConfigError:
        return ConfigError(
            f"teacher {self.source} is {self.what}: its layers cannot be read, so methods that "
            "use teacher features (fitnet, stablekd, the SSL methods, subset.features=teacher) "
            f"cannot use it; {self.hint}"
        )

    # fitnet and the SSL heads read hook_layers with getattr(..., []): raise instead of []
    @property
    def hook_layers(self) -> list[str]:
        """Refused: no layers to hook."""
        raise self._refuse()

    def stagewise_blocks(self) -> list[Any]:
        """Refused: stablekd cannot split an opaque network into blocks."""
        raise self._refuse()

    def get_submodule(self, target: str) -> nn.Module:
        """Only the module itself: forward hooks on inner layers would never fire."""
        if target == "":
            return self
        raise self._refuse()


# element types of ONNX inputs a teacher accepts, as numpy dtypes
ONNX_INPUT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
}


def _to_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return x * std.to(x) + mean.to(x)


def _stats(bundle: Any) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(list(bundle.mean), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(list(bundle.std), dtype=torch.float32).view(1, -1, 1, 1)
    return mean, std


class _FileModel(OpaqueModel):
    """A network read from a file; given a bundle, its input is mapped back to pixels in [0, 1]."""

    def __init__(self, source: str, what: str, bundle: Any = None):
        super().__init__(source, what)
        self.pixels = bundle is not None  # undo the run's normalisation with its mean and std
        mean, std = _stats(bundle) if bundle is not None else (torch.zeros(1), torch.ones(1))
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def convert(self, x: torch.Tensor) -> torch.Tensor:
        """The batch as the file's network takes it."""
        return _to_pixels(x, self.mean, self.std) if self.pixels else x


class ScriptedModel(_FileModel):
    """A TorchScript network (logits)."""

    def __init__(self, net: torch.jit.ScriptModule, source: str, bundle: Any = None):
        super().__init__(source, "a TorchScript file", bundle)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the scripted network."""
        return self.net(self.convert(x))


class OnnxModel(_FileModel):
    """An ONNX graph run by onnxruntime on the CPU: inputs on any device, output on theirs."""

    def __init__(self, session: Any, source: str, bundle: Any = None):
        super().__init__(source, "an ONNX file", bundle)
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = session.get_outputs()[0].name
        self.dtype = ONNX_INPUT_TYPES[inp.type]
        batch = inp.shape[0] if inp.shape else None
        # a graph exported with a fixed batch size is fed chunks of exactly that size
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def _run(self, x: Any) -> Any:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The graph's first output for the batch (logits or probabilities)."""
        feed = self.convert(x.detach()).float().cpu().numpy()
        feed = np.ascontiguousarray(feed, dtype=self.dtype)
        n, size = feed.shape[0], self.fixed_batch
        if size is None or n == size:
            out = self._run(feed)
        else:
            parts = []
            for start in range(0, n, size):
                chunk = feed[start : start + size]
                pad = size - chunk.shape[0]
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
                parts.append(self._run(chunk)[: size - pad])
            out = np.concatenate(parts)
        return torch.from_numpy(np.asarray(out)).to(x.device)


class PixelInputHook:
    """Forward pre-hook: the run's normalised batch back to pixels in [0, 1]."""

    def __init__(self, bundle: Any):
        self.mean, self.std = _stats(bundle)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (_to_pixels(args[0], self.mean, self.std), *args[1:])


def refuse_stagewise_pixels() -> list[Any]:
    """Set as a pixel-input model's stagewise_blocks: stablekd would skip the input conversion."""
    raise ConfigError(
        "stablekd runs the teacher block by block, which skips teacher_input=pixels; "
        "put the normalisation inside the teacher class and use teacher_input=normalized"
    )


class QueryLedger:
    """Images answered and the budget: shared by a black-box teacher and its ``.model`` view."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self.queries = 0

    def charge(self, n: int) -> None:
        """Count ``n`` images, or refuse them all if they would pass the budget."""
        if self.budget is not None and self.queries + n > self.budget:
            raise BudgetExceededError(
                f"query budget exceeded: {self.queries} used + {n} asked > budget {self.budget}"
            )
        self.queries += n


class AnswerView(OpaqueModel):
    """What a black-box teacher reveals, as a module returning log-probabilities.

    Methods that wrap ``teacher.model`` in their own black box get no more than the teacher's
    kind (a hard teacher's view is log one-hot) and every image is charged to its budget.
    """

    def __init__(
        self,
        scorer: nn.Module,
        kind: str,
        outputs: str,
        num_classes: int,
        ledger: QueryLedger,
        source: str,
    ):
        super().__init__(
            source, f"a black-box ('{kind}') teacher", "use a white-box teacher for such methods"
        )
        self.scorer = scorer
        self.kind = kind
        self.outputs = outputs
        self.num_classes = num_classes
        self.ledger = ledger

    @torch.no_grad()
    def answer(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ('soft') or labels ('hard'); counted against the budget."""
        self.ledger.charge(x.shape[0])
        scores = self.scorer(x).float()
        probs = scores if self.outputs == "probs" else torch.softmax(scores, dim=1)
        return probs if self.kind == "soft" else probs.argmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the answer, so softmax of it gives the answer back."""
        a = self.answer(x)
        probs = F.one_hot(a, self.num_classes).float() if self.kind == "hard" else a
        return torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny))


class OpaqueBlackBoxTeacher(nn.Module):
    """A teacher seen only through probabilities ('soft') or labels ('hard'), with a budget."""

    def __init__(
        self,
        scorer: nn.Module,
        kind: str = "soft",
        budget: int | None = None,
        outputs: str = "logits",
        num_classes: int = 10,
        source: str = "teacher",
    ):
        super().__init__()
        if kind not in ("soft", "hard"):
            raise ValueError(f"black-box teacher kind must be 'soft' or 'hard', got {kind!r}")
        self.kind = kind
        self.ledger = QueryLedger(budget)
        self.model = AnswerView(scorer, kind, outputs, num_classes, self.ledger, source)
        self.train(False)

    @property
    def budget(self) -> int | None:
        """Images this teacher answers in all (None: unlimited)."""
        return self.ledger.budget

    @budget.setter
    def budget(self, value: int | None) -> None:
        self.ledger.budget = value

    @property
    def queries(self) -> int:
        """Images answered so far (the probe at load time is not counted)."""
        return self.ledger.queries

    @queries.setter
    def queries(self, value: int) -> None:
        self.ledger.queries = value

    @property
    def remaining(self) -> int | None:
        """Queries left before the budget is spent (None: unlimited)."""
        return None if self.budget is None else self.budget - self.queries

    def train(self, mode: bool = True) -> OpaqueBlackBoxTeacher:
        """Stay in eval mode."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """Probabilities or labels; refuses a batch that would exceed the budget."""
        answer = self.model.answer(x)
        if self.kind == "soft":
            return TeacherOutput(probs=answer)
        return TeacherOutput(labels=answer)
