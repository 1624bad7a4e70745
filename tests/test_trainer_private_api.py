"""The private library API qctrain uses (qctrain.private_api lists it), pinned to the locked versions.

When a library moves, this fails loudly: re-read the code the entry names, adjust ours (or drop it for a public
API), then update the pins in private_api.CHECKED_ON. A private name used in the package (or bench/) but not listed
there fails here too.
"""

import ast
import inspect
import re
from pathlib import Path

import bitsandbytes
import transformers
import trl
from qctrain import private_api
from qctrain.train import AtomicCheckpoints, QcTrainer
from transformers import Trainer

ROOT = Path(__file__).resolve().parents[1]
LOCK_IN = ROOT / "docker" / "requirements.in"
DOCUMENTED = {"_exit"}  # os._exit: underscored, and documented as the standard library's public API


def test_the_pins_are_the_locked_and_installed_versions():
    pins = dict(re.findall(r"^([\w-]+)==(\S+)$", LOCK_IN.read_text(encoding="utf-8"), re.M))
    installed = {"transformers": transformers.__version__, "trl": trl.__version__,
                 "bitsandbytes": bitsandbytes.__version__}
    for package, version in installed.items():
        assert private_api.CHECKED_ON[package] == pins[package] == version, (
            f"{package} {version} (locked: {pins[package]}): re-check every private_api entry on {package}, then "
            f"update private_api.CHECKED_ON")


def test_the_two_private_methods_keep_their_shape():
    assert set(private_api.TRAINER_CHECKPOINTS.names) == {"_save_checkpoint", "_get_output_dir"}
    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    source = inspect.getsource(Trainer._save_checkpoint)
    # The staging trick: the checkpoint folder is <_get_output_dir(trial)>/checkpoint-<global_step>.
    assert "run_dir = self._get_output_dir(trial=trial)" in source
    assert 'checkpoint_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"' in source
    assert "os.path.join(run_dir, checkpoint_folder)" in source


def test_only_the_adapter_overrides_private_trainer_methods():
    from trl import SFTTrainer

    private = {name for name in dir(SFTTrainer) if name.startswith("_") and not name.startswith("__")}
    assert {name for name in vars(AtomicCheckpoints) if name in private} == set(private_api.TRAINER_CHECKPOINTS.names)
    assert not {name for name in vars(QcTrainer) if name in private}


def test_the_preference_trainers_override_only_the_pinned_private_methods():
    """DPO/KTO (qctrain.preference): besides the checkpoint adapter, `_prepare_dataset` alone, which TRL 1.16 calls
    on every data set it is given (there is no switch to skip its tokenizing) and which the prepared rows pass
    through unchanged."""
    from qctrain.preference import QcDPOTrainer, QcKTOTrainer
    from trl import DPOTrainer, KTOTrainer

    for ours, theirs in ((QcDPOTrainer, DPOTrainer), (QcKTOTrainer, KTOTrainer)):
        private = {name for name in dir(theirs) if name.startswith("_") and not name.startswith("__")}
        assert {name for name in vars(ours) if name in private} == set(private_api.PREFERENCE_PREPARE.names)
        assert list(inspect.signature(theirs._prepare_dataset).parameters) == [
            "self", "dataset", "processing_class", "args", "dataset_name"]
        source = inspect.getsource(theirs.__init__)
        assert 'train_dataset = self._prepare_dataset(train_dataset, processing_class, args, "train")' in source
        assert 'eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, "eval")' in source
        # TRL's checkpoint writes its card, then the Trainer's, which writes into _get_output_dir (our staging)
        assert "super()._save_checkpoint(model, trial)" in inspect.getsource(theirs._save_checkpoint)


def test_sft_trainer_keeps_its_metrics_where_compute_loss_writes_them():
    """QcTrainer.compute_loss keeps num_tokens, entropy and mean_token_accuracy as SFTTrainer.compute_loss does:
    in _metrics[mode] (which SFTTrainer.log averages and logs) and _total_train_tokens; it reads aux_loss_enabled."""
    from trl import SFTTrainer

    assert set(private_api.SFT_TRAINER_METRICS.names) == {"_metrics", "_total_train_tokens", "aux_loss_enabled"}
    init = inspect.getsource(SFTTrainer.__init__)
    assert 'self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}' in init
    assert "self._total_train_tokens = 0" in init
    assert "self.aux_loss_enabled = " in init
    loss = inspect.getsource(SFTTrainer.compute_loss)
    assert 'self._metrics[mode]["num_tokens"] = [self._total_train_tokens]' in loss
    assert "self._total_train_tokens += " in loss
    assert 'self._metrics[mode]["entropy"].append(' in loss
    assert 'self._metrics[mode]["mean_token_accuracy"].append(' in loss
    assert "if self.aux_loss_enabled:" in loss
    assert "self._metrics[mode]" in inspect.getsource(SFTTrainer.log)
    assert callable(Trainer.get_tp_size)  # public: what QcTrainer divides the token count by


def test_chat_template_functions_render_as_render_jinja_template_calls_them():
    from qctrain.data import tokens
    from transformers.utils import chat_template_utils
    from transformers.utils.chat_template_utils import render_jinja_template

    names = private_api.CHAT_TEMPLATE.names
    assert all(callable(getattr(chat_template_utils, name, None)) for name in names), names
    assert list(inspect.signature(chat_template_utils._compile_jinja_template).parameters) == ["chat_template"]
    assert list(inspect.signature(chat_template_utils._render_with_assistant_indices).parameters) == [
        "compiled_template", "messages", "tools", "documents", "add_generation_prompt", "template_kwargs"]
    source = inspect.getsource(render_jinja_template)
    assert all(f"{name}(" in source for name in names), names
    messages = [[{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]]
    template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}<|end|>{% endif %}\n"
                "{% endfor %}{{ eos_token }}")
    special = {"eos_token": "<|endoftext|>"}
    direct = tokens._render_direct(messages, template, special)
    assert direct is not None, "the fast render fell back: a private function is missing"
    texts, spans = render_jinja_template(conversations=messages, chat_template=template,
                                         return_assistant_tokens_mask=True, **special)
    assert direct == (texts, spans) and spans[0]


def test_pool_pipes_are_where_workers_widens_them():
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        for queue in (pool._inqueue, pool._outqueue):
            assert queue._writer.fileno() > 2
    assert set(private_api.POOL_PIPES.names) == {"_inqueue", "_outqueue", "_writer"}


def test_bitsandbytes_stand_in_and_trl_preparation_are_there():
    from bitsandbytes import cextension
    from trl import SFTTrainer

    [mock] = private_api.BNB_LIBRARY.names
    assert isinstance(getattr(cextension, mock, None), type)
    assert not type(cextension.lib).__name__.startswith("ErrorHandlerMock")  # loaded here: doctor tells it apart
    [prepare] = private_api.TRL_PREPARE.names
    assert callable(getattr(SFTTrainer, prepare, None))


def _our_names(trees: list[ast.AST]) -> set[str]:
    """Names our own code defines: functions, classes, arguments, variables and attributes it assigns."""
    ours = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                ours.add(node.name)
            elif isinstance(node, ast.arg):
                ours.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                ours.add(node.id)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for part in ast.walk(target):
                        if isinstance(part, ast.Attribute):
                            ours.add(part.attr)
    return ours


def _private_names_used(tree: ast.AST) -> dict[str, int]:
    """Underscored names this code reads off objects: attributes, getattr/hasattr strings, __dict__ lookups."""
    used = {}
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)):
            name = node.args[1].value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and ast.unparse(node.func.value).endswith("__dict__") and node.args
              and isinstance(node.args[0], ast.Constant)):
            name = node.args[0].value
        if isinstance(name, str) and name.startswith("_") and not name.startswith("__"):
            used.setdefault(name, node.lineno)
    return used


def test_every_private_name_used_is_listed():
    files = [*(ROOT / "entrypoint" / "qctrain").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in files}
    ours = _our_names(list(trees.values()))
    unlisted = [f"{path.relative_to(ROOT)}:{line}: {name}" for path, tree in trees.items()
                for name, line in _private_names_used(tree).items()
                if name not in ours and name not in private_api.NAMES and name not in DOCUMENTED]
    assert not unlisted, "private library names not in qctrain.private_api: " + "; ".join(unlisted)


def test_the_fused_head_asks_use_triton_whether_to_score_only_the_completions():
    """preference.compact_head_on_cpu: TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) reads the module's
    _use_triton at call time to choose the compact path (only the completion positions) or every position."""
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    [name] = private_api.TRL_FUSED_HEAD.names
    assert callable(getattr(trl_utils, name)) and getattr(chunked_logprob, name) is not None
    source = inspect.getsource(trl_utils.add_fused_lm_head)
    assert "compact = _use_triton(hidden_states.device)" in source
    assert "hidden_states[mask] if compact else" in source
