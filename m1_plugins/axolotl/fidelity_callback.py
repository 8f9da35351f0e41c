"""Held-out fidelity during training: every `every` steps (and before the first), the student's per-token KL both
ways and top-1 agreement with the teacher on the last turns of held-out conversations (the teacher's own answers,
as `m1 data --teacher` writes them). Logged with the trainer's metrics and appended to output_dir/m1_fidelity.jsonl
with the tokens trained on so far, which `m1 curves` draws."""

import json
from pathlib import Path

from transformers import TrainerCallback

from ..fidelity import FIDELITY_LOG, fidelity_report


class FidelityCallback(TrainerCallback):
    def __init__(self, trainer, path: str, every: int, max_length: int):
        self.trainer, self.every, self.max_length = trainer, every, max_length
        with open(path) as f:
            self.conversations = [json.loads(line)["messages"] for line in f if line.strip()]
        self.log_path = Path(trainer.args.output_dir) / FIDELITY_LOG

    def on_train_begin(self, args, state, control, **kwargs):
        if self.log_path.is_file():
            # a resumed run: measurements after its checkpoint are dropped (they will be taken again) and the token
            # count goes on from the checkpoint's
            lines = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
            done = [r for r in lines if r["step"] <= state.global_step]
            if state.is_world_process_zero:
                tmp = self.log_path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in done))
                tmp.replace(self.log_path)
            self.trainer.tokens_seen = done[-1]["tokens"] if done else 0
            if done and done[-1]["step"] == state.global_step:
                return
        self.measure(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.measure(state)

    def measure(self, state) -> None:
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:
            result = fidelity_report(self.trainer.teacher, model, self.trainer.processing_class, self.conversations,
                                     max_length=self.max_length, responses_only=True, progress=False)
        finally:
            model.train(was_training)
        record = {"step": state.global_step, "tokens": self.trainer.tokens_seen,
                  "kl_student_teacher": result["kl_student_teacher"], "kl_teacher_student": result["kl_teacher_student"],
                  "top1_agreement": result["top1_agreement"], "scored_tokens": result["tokens"]}
        if state.is_world_process_zero:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        # logged with the next training loss (a log from inside a callback would disturb the trainer's own)
        self.trainer.pending_logs.update({"fidelity/top1": record["top1_agreement"],
                                          "fidelity/reverse_kl": record["kl_student_teacher"],
                                          "fidelity/forward_kl": record["kl_teacher_student"]})
