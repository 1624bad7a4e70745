"""Command line: wires the stages recipe -> preflight -> data -> model -> train -> export -> publish."""

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from qctrain import __version__
from qctrain.atomic import write_json_atomic
from qctrain.console import log_to_stderr, say
from qctrain.errors import ExitCode, InputError, QcError, shorten
from qctrain.secretmask import mask, masked_streams


def _quiet_libraries(debug: bool) -> None:
    """Set up logging and warnings before any library is imported (the CLI imports them lazily, so a
    bad recipe fails fast): without --debug, stderr holds qctrain's own lines and library errors only."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes on AVX512-BF16 CPUs fetches a kernel from the Hub through the `kernels` package at
    # import; an offline container must not reach for the Hub, so that import fails at once here.
    sys.modules.setdefault("kernels", None)
    root = logging.getLogger()  # library logs: through the mask, like every line qctrain writes
    root.setLevel(logging.INFO if debug else logging.ERROR)
    log_to_stderr(root, "%(name)s: %(levelname)s: %(message)s")
    if debug:
        return
    warnings.simplefilter("ignore")  # library deprecations and notes: not the user's to act on
    ours = logging.getLogger("qctrain")  # our own warnings (Hub retries, a checkpoint not pushed) still show
    ours.setLevel(logging.WARNING)
    ours.propagate = False
    log_to_stderr(ours, "qctrain: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not sys.stderr.isatty():  # a log file or `kubectl logs`: no "Loading weights" / download bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d/gloo notes under torchrun
    os.environ.setdefault("WANDB_SILENT", "true")  # its banner and sync hints: qctrain says where the run is


def _load(args):
    from qctrain.recipe import load_recipe

    return load_recipe(args.recipe, args.set)


def _print_data_summary(report: dict, cached: bool) -> None:
    """What became of every record read: read = kept (train + eval) + bad + duplicates + overlong (+ records
    left with no supervised token), in total, by reason and per source (the same counts as data_report.json)."""
    train, counts = report["train"], report["counts"]
    unsupervised = f", {counts['unsupervised']} unsupervised" if counts["unsupervised"] else ""
    unit = {"dpo": "pairs", "kto": "rows"}.get(report.get("method", "sft"), "records")
    print(f"data: {counts['read']} read, {counts['duplicates']} duplicates, {counts['bad']} bad, "
          f"{counts['overlong']} overlong{unsupervised} -> {counts['kept']} kept: {counts['train']} train / "
          f"{counts['eval']} eval {unit}; {train['tokens']} train tokens, {train['supervised_fraction']:.1%} "
          f"supervised, {train['sequences']} sequences{' (cached)' if cached else ''}")
    if counts["bad_by_reason"]:
        print("data: bad records by reason: "
              + ", ".join(f"{reason} {n}" for reason, n in counts["bad_by_reason"].items()))
        first_bad = next(e for s in report["sources"].values() for e in s["examples"])
        print(f"data: first bad record: {first_bad}")
    if counts["truncated"]:
        print(f"data: {counts['truncated']} records truncated to data.max_seq_length (data.on_overlong: truncate)")
    if counts["context_turns"]:
        print(f"data: assistant turns: {counts['supervised_turns']} supervised, {counts['context_turns']} left in "
              "the context (weight 0 / train or loss false)")
    balance = report.get("kto", {})
    if "desirable_weight_range" in balance:  # TRL's KTOTrainer logs this as a warning, hidden here without --debug
        low, high = balance["desirable_weight_range"]
        u_low, u_high = balance["undesirable_weight_range"]
        print(f"data: KTO rows: {balance['desirable']} desirable, {balance['undesirable']} undesirable; for the "
              f"imbalance the KTO paper suggests train.desirable_weight in [{low}, {high}] or "
              f"train.undesirable_weight in [{u_low}, {u_high}] (not both)")
    reasoning = report.get("reasoning", {})
    if reasoning.get("traces"):
        how = {"template": "rendered by the chat template", "think_block": "written as think blocks, trained on",
               "dropped": "dropped (data.reasoning: drop)"}[reasoning["rendered_by"]]
        print(f"data: {reasoning['traces']} reasoning traces {how}")
    for name, source in report["sources"].items():
        if source["unread_keys"]:
            keys = ", ".join(f"{key} ({n} records)" for key, n in source["unread_keys"].items())
            print(f"data: {name}: keys not read, ignored: {keys} (name them in the source's ignore_keys to "
                  "silence this)")
    if len(report["sources"]) > 1:
        for name, source in report["sources"].items():
            print(f"data: {name}: {source['read']} read = {source['kept']} kept ({source['train']} train, "
                  f"{source['eval']} eval) + {source['bad']} bad + {source['duplicates']} duplicates + "
                  f"{source['overlong']} overlong + {source['unsupervised']} unsupervised")


def cmd_validate(args) -> int:
    from qctrain.recipe import dump_recipe

    print(dump_recipe(_load(args)), end="")
    return 0


def cmd_check(args) -> int:
    from qctrain.preflight import run_checks

    recipe = _load(args)
    problems = run_checks(recipe)
    if problems:
        raise InputError("\n".join(f"preflight: {p}" for p in problems))
    print("preflight: ok")
    return 0


def _prepare(recipe, tokenizer=None):
    from qctrain import data, distributed
    from qctrain.basemodel.load import load_tokenizer
    from qctrain.rundir import RunDir

    run = RunDir.of(recipe)
    run.root.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    with distributed.main_process_first():  # several processes: rank 0 prepares, the others read the cache
        prepared = data.prepare(recipe.data, tokenizer, run.root, method=recipe.method)
    if distributed.is_main():
        write_json_atomic(run.data_report, prepared.report, shared=True)
    return tokenizer, prepared


def cmd_prepare(args) -> int:
    from qctrain import rundir

    recipe = _load(args)
    args.stop.stage = "while preparing the data; nothing half-written was kept"
    with rundir.hold(rundir.RunDir.of(recipe).root):
        _, prepared = _prepare(recipe)
    _print_data_summary(prepared.report, prepared.cached)
    print(f"prepared data: {prepared.dir}")
    print("sample (supervised tokens between ⟦ ⟧):")
    print(prepared.report["sample"])
    return 0


def cmd_train(args) -> int:
    from qctrain import distributed

    if args.nproc is not None and not distributed.under_launcher():
        nproc = distributed.resolve_nproc(args.nproc)
        if nproc > 1 or distributed.multi_node():
            if not Path(args.recipe).is_file():  # the workers check the rest, each
                raise InputError(f"{args.recipe}: recipe file not found")
            distributed.exec_launcher(distributed.strip_option(args.argv, "--nproc"), nproc)
    return _train(args, args.stop)  # SIGTERM/SIGINT: checkpoint and exit 75 (see signals.py, train.py)


def _train(args, stop) -> int:
    from qctrain import cudacompat, distributed, rundir
    from qctrain.preflight import check_train_args, run_checks

    recipe = _load(args)
    cudacompat.check_driver()  # a driver too old for the image's CUDA, where forward compatibility cannot help: exit 3
    problems = run_checks(recipe) + check_train_args(recipe)  # check_train_args: TRL's own SFTConfig rules
    if problems:
        raise InputError("\n".join(f"preflight: {p}" for p in problems))
    distributed.check_fsdp(recipe)
    with rundir.hold(rundir.RunDir.of(recipe).root, enabled=distributed.is_main()):  # one run per output folder
        return _train_held(recipe, args, stop)


def _train_held(recipe, args, stop) -> int:
    """The stages of `train` in the held output folder: data, model, training, evaluation, outputs, push."""
    from qctrain import checkpoint, distributed, trackers, train
    from qctrain.basemodel.load import load_tokenizer
    from qctrain.rundir import RunDir

    parent = _parent(recipe)
    identity = parent.identity() if parent else None
    plan = checkpoint.plan_resume(recipe, args.restart, identity)  # a changed recipe (or adapter) fails here, fast
    stop.stage = "while preparing the data; nothing half-written was kept"
    tokenizer = load_tokenizer(recipe.model)
    if _finished_before(recipe, plan, tokenizer):
        return _complete(recipe, plan, stop)
    tokenizer, prepared = _prepare(recipe, tokenizer)
    plan.check_data(prepared.fingerprint)
    distributed.check_same_run(prepared.fingerprint, plan.step)
    if distributed.is_main() or not prepared.cached:  # every process that tokenized says so
        _print_data_summary(prepared.report, prepared.cached)
    tracker_env = _trackers(recipe)
    trainer = _trainer(recipe, tokenizer, prepared, stop, parent)
    result = train.run(trainer, plan, stop)
    # FSDP: gathered by every rank, else None (not after finish_from_checkpoint: nothing was sharded)
    adapter_state = distributed.full_adapter_state(trainer) if not plan.finished else None
    held = _heldout(recipe, trainer, result, prepared, stop)
    if not distributed.is_main():
        return 0  # rank 0 writes the outputs and pushes
    _write_outputs(recipe, trainer, tokenizer, prepared, result, adapter_state, held, stop, identity)
    for line in trackers.offline_runs(RunDir.of(recipe).root) if tracker_env.get("WANDB_MODE") == "offline" else []:
        print(line)
    return _publish(recipe, stop)


def _parent(recipe):
    """The adapter a dpo/kto run continues (model.adapter), resolved once per machine (a Hub one is fetched by
    the first process), or None."""
    from qctrain import distributed, parent

    if recipe.model.adapter is None:
        return None
    with distributed.main_process_first():
        return parent.resolve(recipe.model.adapter)


def _finished_before(recipe, plan, tokenizer) -> bool:
    """Whether the outputs in output.dir are those of this recipe and data, written after the newest checkpoint
    (a rerun of a finished run: told before any data is prepared). A checkpoint of other data is refused here."""
    from qctrain import data
    from qctrain.rundir import RunDir

    if plan.restart or (plan.newest is None and not RunDir.of(recipe).manifest.is_file()):
        return False
    fingerprint = data.fingerprint(recipe.data, tokenizer, recipe.method)
    plan.check_data(fingerprint)
    return plan.outputs_current(fingerprint)


def _trackers(recipe) -> dict[str, str]:
    """Where the experiment trackers write when the environment does not say (trackers.apply), told once."""
    from qctrain import distributed, trackers
    from qctrain.rundir import RunDir

    tracker_env = trackers.apply(recipe.sft_kwargs().get("report_to"), RunDir.of(recipe).root)
    if tracker_env and distributed.is_main():
        print("trackers: " + " ".join(f"{name}={value}" for name, value in tracker_env.items()))
    return tracker_env


def _trainer(recipe, tokenizer, prepared, stop, parent=None):
    """The base loaded (its Linear layers checked against lora.target_modules) and the method's trainer built on it
    (dpo/kto: continuing `parent`, the adapter model.adapter names), pushing its checkpoints where the recipe
    says."""
    from qctrain import distributed, publish, train
    from qctrain.basemodel import files, load
    from qctrain.rundir import RunDir

    run = RunDir.of(recipe)
    stop.stage = "while loading the model; nothing to save"
    base = load.load_base_model(recipe.model)
    if parent is None:  # a continued adapter keeps the targets it was trained with
        files.check_lora_targets(recipe.lora.target_modules,
                                 files.linear_module_names(load.linear_weights(base), base.config.to_dict()),
                                 recipe.model.name)
    if recipe.method == "sft":
        trainer = train.build_trainer(recipe, base, tokenizer, prepared, run.root, stop=stop)
    else:
        from qctrain import preference

        trainer = preference.build_preference_trainer(recipe, base, tokenizer, prepared, run.checkpoints, run.root,
                                                      stop, parent.adapter_dir if parent else None,
                                                      parent.identity() if parent else None)
    if distributed.fsdp_requested(recipe) and not distributed.fsdp_enabled(trainer) and distributed.is_main():
        say("qctrain: warning: FSDP was asked for but accelerate did not enable it here (CPU processes train "
            "as DDP)\n")
    publisher = publish.publisher_for(recipe)
    if publisher is not None and publisher.checkpoints:
        trainer.add_callback(train.CheckpointPusher(publisher, stopping=lambda: stop.signum is not None))
    return trainer


def _heldout(recipe, trainer, result, prepared, stop) -> dict | None:
    """The base's held-out loss and accuracy beside the tuned model's (evaluate.heldout), on every rank: the
    evaluation gathers across ranks. None without evaluate: or a held-out split, and on an FSDP-sharded model."""
    from qctrain import distributed, evaluate

    section = recipe.evaluate
    if section is None or not section.heldout or trainer.eval_dataset is None or distributed.fsdp_enabled(trainer):
        return None
    stop.stage = "while evaluating; the adapter is trained"
    return evaluate.heldout(trainer, result.metrics, prepared.report.get("eval", {}).get("records"))


def _write_outputs(recipe, trainer, tokenizer, prepared, result, adapter_state, held, stop, parent=None) -> None:
    """The outputs of a finished training: the evaluation (with an evaluate: section) or samples of the trained
    model beside the base's, then everything the writer puts into output.dir (parent: the adapter a dpo/kto
    run continued)."""
    from qctrain import checkpoint, data, distributed, evaluate, outputs
    from qctrain.card import Sample
    from qctrain.finished.generate import before_after_samples
    from qctrain.rundir import RunDir

    run = RunDir.of(recipe)
    # Generating or scoring from an FSDP-sharded model would need every rank: samples and evaluation skipped there.
    sharded = distributed.fsdp_enabled(trainer)
    prompts = [] if sharded else prepared.report.get("heldout_prompts", [])
    # The template the adapter carries: what training rendered (tools, traces), without the training markers.
    chat_template = data.extend_template(data.resolve_chat_template(recipe.data.chat_template, tokenizer),
                                         recipe.data.reasoning)
    evaluation = None
    if recipe.evaluate is None:
        samples = before_after_samples(trainer.model, tokenizer, prompts,  # the base: adapter disabled
                                       chat_template=chat_template)
    else:
        evaluation = _evaluate_trained(recipe, trainer, tokenizer, prompts, chat_template, held, sharded, stop)
        evaluate.append_metrics(run.metrics, evaluate.metrics_rows(evaluation, result.global_step))
        samples = [Sample(**sample) for sample in evaluation.get("samples", [])]
    newest = checkpoint.complete_checkpoints(run.checkpoints)
    outputs.write_outputs(outputs.TrainedRun(
        recipe, trainer, tokenizer, chat_template, prepared.report, prepared.dir / "split.json", result.metrics,
        result.log_history, result.started, result.finished, samples, state_dict=adapter_state,
        checkpoint=checkpoint.checkpoint_record(newest[-1] if newest else None), evaluation=evaluation,
        parent=parent))
    print(f"done: adapter in {run.adapter} (train_loss {result.metrics.get('train_loss', float('nan')):.4f})")


def _evaluate_trained(recipe, trainer, tokenizer, prompts, chat_template, held, sharded, stop) -> dict:
    """The evaluate: section on the model training just left in memory (no second load of the base)."""
    import gc

    import torch

    from qctrain import evaluate

    if sharded:
        report = {"skipped": "the model was sharded (FSDP); evaluate with `qctrain eval OUTPUT_DIR`", "tasks": {}}
        if recipe.evaluate.gate:
            report["gate"] = evaluate.gate(report, recipe.evaluate.gate)
        return report
    stop.stage = "while evaluating; the adapter is trained"
    trainer.optimizer = trainer.lr_scheduler = None  # room for lm-eval's batches: training is over
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return evaluate.evaluate_model(trainer.model, tokenizer, recipe.evaluate, prompts, chat_template, held,
                                   should_stop=lambda: stop.signum is not None)


def _complete(recipe, plan, stop) -> int:
    """A rerun of a run that finished: nothing is trained; the stages that did not finish (the GGUF export, the
    push) are completed, and those that did are left as they are."""
    from qctrain import distributed
    from qctrain.atomic import restore_interrupted_swap
    from qctrain.finished import evaluate as evaluate_finished
    from qctrain.finished.gguf_lora import write_gguf
    from qctrain.rundir import RunDir

    if not distributed.is_main():
        return 0
    run = RunDir.of(recipe)
    restore_interrupted_swap(run.adapter)
    step = f"step {plan.step}, {plan.newest.name}" if plan.newest is not None else "no checkpoint kept"
    print(f"run complete: adapter in {run.adapter} ({step}); nothing to train (rerun with --restart to train "
          "again)", flush=True)
    if recipe.output.gguf and not any(run.gguf.glob("*.gguf")):
        stop.stage = "while writing the GGUF export; the adapter is complete"
        done = write_gguf(run.root)
        print(f"GGUF LoRA adapter: {run.gguf / done.adapter.name}")
    if recipe.evaluate is not None and not evaluate_finished.evaluated(run):  # stopped in it, or added since
        stop.stage = "while evaluating; the adapter is complete"
        target = evaluate_finished.EvalTarget(str(run.root), recipe, run, run.root)
        report = evaluate_finished.evaluate_saved(target, should_stop=lambda: stop.signum is not None)
        evaluate_finished.record_evaluation(run.root, report)
    return _publish(recipe, stop)


def _publish(recipe, stop) -> int:
    """Push the finished run where the recipe says. A signal before this point (training, export) made it through
    its stage: no push. One during the push stops it (one process: a rerun completes it)."""
    from qctrain import distributed, publish
    from qctrain.rundir import RunDir

    output_dir = RunDir.of(recipe).root
    stopped_by = stop.name if stop.signum else None
    if stopped_by is None and distributed.world_size() == 1:
        stop.stage = f"during the push; outputs complete in {output_dir}, not pushed"
        stop.interrupt_now()
    return publish.publish_after_training(recipe, output_dir, stopped_by, distributed.world_size())


def cmd_push(args) -> int:
    from qctrain import publish

    return publish.push_again(Path(args.output_dir), ignore_gate=args.ignore_gate)


def cmd_eval(args) -> int:
    """Evaluate a finished run, an adapter folder or a Hub adapter against its base (evaluate: section)."""
    from qctrain import card, evaluate, rundir
    from qctrain.finished import evaluate as evaluate_finished

    target = evaluate_finished.eval_target(args.path, args.recipe, args.set, args.out)
    section = target.recipe.evaluate
    problems = evaluate.check_tasks(section, section.gate if section else [])  # before any weight loads
    if problems:
        raise InputError("\n".join(f"preflight: {p}" for p in problems))
    held = target.run.root if target.run is not None else target.out
    with rundir.hold(held, enabled=target.run is not None):  # a run folder: one writer at a time
        report = evaluate_finished.evaluate_saved(target, should_stop=lambda: args.stop.signum is not None)
        if target.run is not None:
            evaluate_finished.record_evaluation(target.run.root, report)
        if target.run is None or target.out != target.run.root:
            target.out.mkdir(parents=True, exist_ok=True)
            evaluate.write_results(target.out / "eval_results.json", report)
    print(card.evaluation_table(report))
    print(f"results: {target.out / 'eval_results.json'} ({report['seconds']['total']:.1f} s)")
    return 0


def cmd_merge(args) -> int:
    import torch

    from qctrain.finished.merge import merge_adapter
    from qctrain.rundir import RunDir

    output_dir = Path(args.output_dir)
    dest = merge_adapter(output_dir, Path(args.dest) if args.dest else RunDir(output_dir).merged,
                         getattr(torch, args.dtype))
    print(f"merged model written to {dest}")
    return 0


def cmd_generate(args) -> int:
    from qctrain import data
    from qctrain.finished.generate import before_after_samples, generate_replies
    from qctrain.finished.load import FinishedRun

    tools = data.read_tools_file(Path(args.tools)) if args.tools else None  # a bad file fails before any loading
    finished = FinishedRun.open(Path(args.output_dir))
    parent_dir = finished.parent_adapter() if args.compare_parent else None  # told before any loading
    adapter_model, tokenizer = finished.load()
    conversation = [[{"role": "user", "content": args.prompt}]]
    if parent_dir is not None:
        from qctrain.finished.generate import parent_samples

        [sample] = parent_samples(adapter_model, tokenizer, conversation, parent_dir, args.max_new_tokens, tools)
        print(f"prompt: {args.prompt}\nparent: {sample.base}\nreply:  {sample.tuned}")
        return 0
    if args.compare_base:
        [sample] = before_after_samples(adapter_model, tokenizer, conversation, args.max_new_tokens, tools=tools)
        print(f"prompt: {args.prompt}\nbase:   {sample.base}\nreply:  {sample.tuned}")
        return 0
    reply = generate_replies(adapter_model, tokenizer, conversation, max_new_tokens=args.max_new_tokens,
                             tools=tools)[0]
    print(f"prompt: {args.prompt}\nreply:  {reply}")
    return 0


def cmd_export(args) -> int:
    from qctrain.finished.gguf_lora import write_gguf
    from qctrain.rundir import RunDir

    output_dir = Path(args.output_dir)
    dest = RunDir(output_dir).gguf
    done = write_gguf(output_dir, args.outtype, args.base_gguf)
    print(f"GGUF LoRA adapter: {dest / done.adapter.name} ({done.tensors} tensors, alpha {done.alpha:g})")
    print(f"Ollama Modelfile:  {dest / done.modelfile.name}")
    return 0


def cmd_tiny_model(args) -> int:
    from qctrain.tiny import write_tiny_model

    path = write_tiny_model(Path(args.dir), hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"tiny Phi-3 model and tokenizer written to {path}")
    return 0


def cmd_doctor(args) -> int:
    from qctrain import distributed
    from qctrain.doctor import run_doctor

    recipe = _load(args) if args.recipe else None
    nproc = distributed.resolve_nproc(args.nproc) if args.nproc else None
    return run_doctor(recipe=recipe, nproc=nproc)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's own default must not reset `qctrain --debug COMMAND` to False
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and library logs")
    with_recipe = argparse.ArgumentParser(add_help=False, parents=[common])
    with_recipe.add_argument("recipe", help="YAML recipe file")
    with_recipe.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                             help="override a recipe value, e.g. --set train.learning_rate=1e-4")

    parser = argparse.ArgumentParser(
        prog="qctrain", parents=[common],
        description="Fine-tune a 4-bit quantized LoRA adapter from one YAML recipe.",
        epilog="exit codes: 0 ok, 1 internal error, 2 bad recipe/data/input, 3 environment (or a lost rank), "
               "4 trained but not pushed, 5 trained but not pushed: not better than the base (evaluate.gate), "
               "74 disk full/quota/read-only (free space, rerun to resume), "
               "75 preempted (checkpoint saved, rerun to resume)")
    parser.add_argument("--version", action="version", version=f"qctrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_text: str, parents: list) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=parents, help=help_text, description=help_text)
        command.set_defaults(func=func)
        return command

    _recipe_commands(add, with_recipe)
    _finished_run_commands(add, common)
    _tool_commands(add, common)
    return parser


def _recipe_commands(add, with_recipe: argparse.ArgumentParser) -> None:
    """The commands that take a recipe: validate, check, prepare, train."""
    add("validate", cmd_validate, "print the fully resolved recipe, or every problem in it", [with_recipe])
    add("check", cmd_check, "preflight: every check that needs no model weights", [with_recipe])
    add("prepare", cmd_prepare, "prepare (and cache) the training data, write data_report.json", [with_recipe])
    train_cmd = add("train", cmd_train, "preflight, prepare, train, export and push; resumes from the newest "
                    "complete checkpoint of the same recipe in output.dir", [with_recipe])
    train_cmd.add_argument("--restart", action="store_true",
                           help="discard the checkpoints in output.dir and train from step 0")
    train_cmd.add_argument("--nproc", metavar="N|auto",
                           help="train in N processes on this node (auto: one per visible GPU) under "
                                "torchrun; PET_* variables (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR...) "
                                "add nodes")


def _finished_run_commands(add, common: argparse.ArgumentParser) -> None:
    """The commands that take a finished run's folder: push, merge, generate, export."""
    push = add("push", cmd_push, "push a finished run's adapter to the Hub", [common])
    push.add_argument("output_dir")
    push.add_argument("--ignore-gate", action="store_true",
                      help="push even where evaluate.gate found the tuned model worse than its base (hub.push: "
                           "if_better)")
    eval_cmd = add("eval", cmd_eval, "evaluate a finished run (or an adapter folder or Hub id, with --recipe) "
                   "against its base: held-out loss and accuracy, lm-eval tasks, sample replies, evaluate.gate; "
                   "writes eval_results.json (a run's manifest, card and metrics.jsonl too)", [common])
    eval_cmd.add_argument("path", metavar="RUN_DIR|ADAPTER|HUB_ID")
    eval_cmd.add_argument("--recipe", help="a recipe whose evaluate: section to run (for an adapter: also its "
                                           "model: base and data: held-out split)")
    eval_cmd.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                          help="override a recipe value, e.g. --set evaluate.limit=100")
    eval_cmd.add_argument("--out", metavar="FOLDER", help="where eval_results.json goes (default: the run or "
                                                          "adapter folder; required for a Hub id)")
    merge = add("merge", cmd_merge, "merge a finished run's adapter into its base (standalone model)", [common])
    merge.add_argument("output_dir")
    merge.add_argument("--dest", help="where to write it (default: OUTPUT_DIR/merged)")
    merge.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    generate = add("generate", cmd_generate, "generate a reply with a trained adapter", [common])
    generate.add_argument("output_dir")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--compare-base", action="store_true",
                          help="also print the base model's reply (the adapter disabled)")
    generate.add_argument("--compare-parent", action="store_true",
                          help="dpo/kto runs: also print the reply of the adapter the run continued (model.adapter)")
    generate.add_argument("--tools", metavar="FILE",
                          help="a JSON list of tool (function) schemas the model may call, rendered by the "
                               "adapter's chat template as in training")
    export_cmd = add("export", cmd_export, "write a finished run's adapter as a GGUF LoRA (llama.cpp, Ollama) "
                     "with an Ollama Modelfile, into OUTPUT_DIR/gguf", [common])
    export_cmd.add_argument("output_dir")
    export_cmd.add_argument("--gguf", action="store_true", required=True,
                            help="GGUF LoRA adapter + Modelfile (the only export format so far)")
    export_cmd.add_argument("--outtype", default="f32", choices=["f32", "f16"], help="tensor type (default f32)")
    export_cmd.add_argument("--base-gguf", metavar="PATH", help="the base model's GGUF file, for the Modelfile's FROM")


def _tool_commands(add, common: argparse.ArgumentParser) -> None:
    """tiny-model and doctor."""
    tiny = add("tiny-model", cmd_tiny_model, "build a tiny random Phi-3 model + tokenizer (tests, demo)", [common])
    tiny.add_argument("dir")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    doctor = add("doctor", cmd_doctor, "check this host in seconds: torch/CUDA/bitsandbytes/GPU, the NVIDIA driver "
                 "and CUDA forward compatibility, /dev/shm, writable folders, free disk, the HF cache (against "
                 "RECIPE if given); exit 3 when a run would fail here", [common])
    doctor.add_argument("recipe", nargs="?", help="YAML recipe to check the host against")
    doctor.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe value, as for train")
    doctor.add_argument("--nproc", metavar="N|auto", help="GPU processes per node, as for train (default: auto)")


MAX_ERROR_LINES = 50  # problems listed (a recipe with thousands of unknown keys is one mistake, told briefly)
MAX_ERROR_CHARS = 300  # characters of one line, whatever the input quoted into it


def error_lines(message: str) -> str:
    """An error message as `qctrain: error: ` lines, secrets masked, each cut to MAX_ERROR_CHARS, at most
    MAX_ERROR_LINES."""
    lines = message.splitlines() or [""]
    shown = [shorten(mask(line), MAX_ERROR_CHARS) for line in lines[:MAX_ERROR_LINES]]  # masked before cut
    if len(lines) > MAX_ERROR_LINES:
        shown.append(f"... and {len(lines) - MAX_ERROR_LINES} more problems")
    return "".join(f"qctrain: error: {line}\n" for line in shown)


def _fault(err: Exception, stop) -> QcError | None:
    """An exception no stage turned into a QcError, named where it can be: a full disk (or quota, or a read-only
    filesystem), a lost rank of a distributed run, or the fallout of a stop signal."""
    from qctrain import distributed
    from qctrain.errors import disk_full

    return disk_full(err) or distributed.lost_peer(err, stopped_by=stop.name if stop.signum else None)


def main(argv: list[str] | None = None) -> int:
    from qctrain.signals import StopOnSignal

    with masked_streams():  # no secret leaves through argparse's usage errors, print, logging or a traceback
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc` hands it on to the workers
        args.debug = getattr(args, "debug", False)
        _quiet_libraries(args.debug)
        args.stop = StopOnSignal().__enter__()  # SIGTERM/SIGINT in any command and stage: one line, exit 75
        if args.command != "train":
            args.stop.stage = f"in `qctrain {args.command}`; nothing half-written was kept"
        try:
            code = _run(args)
        finally:
            args.stop.release()
        if argv is None and args.stop.signum is not None:
            _exit_now(code)
        return code


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except QcError as err:
        return _report(err, args.debug)
    except KeyboardInterrupt:
        say("qctrain: interrupted\n")
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if (fault := _fault(err, args.stop)) is not None:
            return _report(fault, args.debug)
        if args.debug:  # the traceback, through the masked stderr (the interpreter's own would not be)
            traceback.print_exc()
            return int(ExitCode.INTERNAL)
        first_line = shorten(mask(str(err).splitlines()[0]) if str(err) else "", MAX_ERROR_CHARS)
        say(f"qctrain: internal error: {type(err).__name__}: {first_line} (rerun with --debug for the traceback)\n")
        return int(ExitCode.INTERNAL)


def _exit_now(code: int) -> None:
    """Stopped by a signal, as the program (not called from Python): the exit code and its line are settled and
    everything of ours is closed, so the process ends now instead of spending seconds of the grace period on the
    interpreter's teardown of torch and the other libraries."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _report(err: QcError, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    say(error_lines(str(err)))
    return int(err.exit_code)
