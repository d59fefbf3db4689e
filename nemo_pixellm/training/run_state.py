"""What the forward step and the callbacks share during one training run: one small object the trainer owns
(``train.run`` makes it and hands it to each), instead of module globals."""

from dataclasses import dataclass, field


def finished_step(context) -> int:
    """The step a callback's ``on_train_step_end`` reports on: Bridge's loop counts it after the callbacks."""
    return context.state.train_state.step + 1


@dataclass
class RunState:
    sample_keys: list[str] = field(default_factory=list)  # this rank's training samples since the last step end
    skipped: list[dict] = field(default_factory=list)  # the bad records the data skipped for them
    view_size: tuple[int, int] | None = None  # (height, width) of the last training views (progressive resolution)

    def record_batch(self, batch: dict) -> None:
        self.sample_keys.extend(member.key for sequence in batch.get("samples", []) for member in sequence)
        self.skipped.extend(batch.get("skipped", []))

    def take_step(self) -> tuple[list[str], list[dict]]:
        """The sample keys and skipped records of the step just finished; starts the next step's lists."""
        keys, skipped = self.sample_keys, self.skipped
        self.sample_keys, self.skipped = [], []
        return keys, skipped

    def view_size_change(self, images) -> str | None:
        """A console line when the training views change size (the data decides, by step), else None."""
        if images is None or images.shape[0] == 0:
            return None
        size = tuple(images.shape[-2:])
        if size == self.view_size:
            return None
        was = f" (was {self.view_size[1]}x{self.view_size[0]})" if self.view_size else ""
        self.view_size = size
        return f"image views {size[1]}x{size[0]}{was}"
