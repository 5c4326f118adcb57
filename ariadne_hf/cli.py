"""The `ariadne` command. Thin: every subcommand parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import sys

from .configuration_ariadne import GENERATION_STRATEGIES, ROUTING_GRANULARITIES, WHITENINGS
from .evaluation.task_metrics import METRICS
from .kernels.distances import DISTANCES


def routing_layer_arg(value: str) -> str | int:
    """`--routing-layer`: "auto" or an integer >= 0 (argparse reports anything else as a usage error)."""
    if value == "auto":
        return value
    try:
        layer = int(value)
    except ValueError:
        layer = -1
    if layer < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0 (a decoder layer), got {value!r}")
    return layer

def _pairs(values: list[str], what: str) -> dict[str, str]:
    result = {}
    for value in values or []:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            raise SystemExit(f"ariadne: {what} must be given as NAME=PATH, got {value!r}.")
        if name in result:
            raise SystemExit(f"ariadne: {what} {name!r} is given twice.")
        result[name] = target
    return result


def cmd_build(args) -> int:
    from .modeling_ariadne import AriadneRoutedModel

    adapters = _pairs(args.adapter, "--adapter")
    prompts = _pairs(args.prompts, "--prompts")
    heldout = _pairs(args.heldout, "--heldout") or None
    model = AriadneRoutedModel.from_adapters(
        args.backbone, adapters, prompts, num_centroids=args.num_centroids, distance=args.distance,
        center=not args.no_center, whitening=args.whitening, seed=args.seed, max_length=args.max_length,
        batch_size=args.batch_size,
        text_field=args.text_field, heldout_prompts=heldout, revision=args.revision,
        reject_threshold=args.reject_threshold, routing_layer=args.routing_layer,
    )
    model.save_pretrained(args.out, include_backbone=args.include_backbone)
    print(f"Wrote bundle {args.out}: {len(adapters)} adapters, {model.router.centroids.shape[0]} centroids.")
    report = model.config.routing_report
    if report:
        print(f"Held-out selection accuracy: macro {report['macro_accuracy']:.1%}, micro {report['micro_accuracy']:.1%}")
    return 0


def _load(bundle: str, args):
    from .modeling_ariadne import AriadneRoutedModel

    kwargs = {"revision": args.revision} if getattr(args, "revision", None) else {}
    return AriadneRoutedModel.from_pretrained(bundle, **kwargs)


def cmd_route(args) -> int:
    model = _load(args.bundle, args)
    decision = model.route(args.prompts)
    if args.json:
        print(json.dumps({"prompts": args.prompts, **decision.to_dict()}, indent=2))
        return 0
    for prompt, name, scores, margin in zip(args.prompts, decision.adapter_names, decision.scores.tolist(),
                                            decision.margins.tolist(), strict=True):
        ranked = sorted(zip(decision.adapter_order, scores, strict=True), key=lambda x: -x[1])[:3]
        shown = ", ".join(f"{n} {s:.3f}" for n, s in ranked)
        print(f"{name:<20} margin {margin:.3f}  [{shown}]  {prompt[:60]!r}")
    return 0


def cmd_generate(args) -> int:
    model = _load(args.bundle, args)
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    texts = args.prompts
    if args.chat and tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in texts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not args.chat)
    out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                         return_dict_in_generate=True, generation_strategy=args.strategy)
    width = batch["input_ids"].shape[1]
    for prompt, name, sequence in zip(args.prompts, out.routes.adapter_names, out.sequences, strict=True):
        text = tokenizer.decode(sequence[width:], skip_special_tokens=True)
        print(f"[{name}] {prompt}\n  -> {text.strip()}")
    return 0


def cmd_info(args) -> int:
    from .bundle.local_io import read_bundle, resolve_bundle_directory
    from .constants import ROUTER_CENTROIDS

    directory = resolve_bundle_directory(args.bundle, {"revision": args.revision} if args.revision else {})
    config, router = read_bundle(directory)
    info = {
        "bundle": directory,
        "backbone": config.backbone_name_or_path,
        "backbone_revision": config.backbone_revision,
        "embedding": [config.embedding_vocab_size, config.embedding_dim],
        "distance": config.distance,
        "center": config.center,
        "whitening": config.whitening,
        "routing": config.routing,
        "centroids": int(router[ROUTER_CENTROIDS].shape[0]),
        "adapters": config.adapters,
        "reject": config.reject,
        "ood_threshold": config.ood_threshold,
        "ood_calibration": config.ood_calibration,
        "routing_layer": config.routing_layer,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"bundle     {directory}\nbackbone   {info['backbone']} @ {info['backbone_revision']}")
    print(f"embedding  V={info['embedding'][0]} D={info['embedding'][1]}; distance {config.distance}; "
          f"center {config.center}; whitening {config.whitening}; routing {config.routing}; "
          f"{info['centroids']} centroids")
    print("signal     " + ("input embedding (routing_layer 0)" if not config.routing_layer else
                           f"base hidden state after layer {config.routing_layer} (routing_layer {config.routing_layer})"))
    if config.ood_calibration:
        from .routing.calibration import calibration_stale

        stale = calibration_stale(config)
        print(f"ood        threshold {config.ood_threshold:.3f} (reject={config.reject!r}), cross-fitted "
              f"{config.ood_calibration.get('folds')} folds, target false rejects "
              f"{config.ood_calibration.get('target_reject_rate'):.1%}" + (f"; STALE: {stale}" if stale else ""))
    for name in config.adapter_names:
        meta = config.adapters.get(name, {})
        accuracy = meta.get("heldout_accuracy")
        shown = "" if accuracy is None else f"  held-out accuracy {accuracy:.1%}"
        print(f"  {name:<24} rank {meta.get('rank')}  targets {meta.get('target_modules')}  prompts "
              f"{meta.get('num_prompts')}  centroids {meta.get('num_centroids')}{shown}")
    return 0


def cmd_demo(args) -> int:
    from .evaluation.demo import run_demo

    run_demo(args.out, examples_per_task=args.examples_per_task, questions_per_task=args.questions_per_task,
             full=args.full)
    return 0


def cmd_eval(args) -> int:
    from .evaluation import evaluate_bundle, read_records
    from .evaluation.reports import ood_table, routing_table, scores_table

    if args.routing != "token" and (args.reroute_every is not None or args.top_k is not None):
        raise ValueError("--reroute-every and --top-k apply to --routing token only.")
    model = _load(args.bundle, args)
    rows = read_records(args.data, text_field=args.text_field, task_field=args.task_field)
    if args.max_per_task:
        rows = first_per_task(rows, args.max_per_task)
    ood_rows = read_records(args.ood, text_field=args.text_field, task_field=None) if args.ood else None
    report = evaluate_bundle(model, rows, task_to_adapter=_pairs(args.task_map, "--task-map"), metric=args.metric,
                             out_dir=args.out, as_chat=not args.plain, ood_rows=ood_rows, routing=args.routing,
                             reroute_every=args.reroute_every, top_k=args.top_k)
    print("\n".join(routing_table(report)))
    if report.get("task_scores"):
        print("\n" + "\n".join(scores_table(report["task_scores"])))
    if report.get("ood"):
        print("\n" + "\n".join(ood_table(report["ood"])))
    print(f"\nReport: {args.out}/report.md")
    return 0


def first_per_task(rows: list[dict], limit: int) -> list[dict]:
    """The first `limit` rows of every task, in file order."""
    taken: dict[str, int] = {}
    kept = []
    for row in rows:
        if taken.get(row["task"], 0) < limit:
            taken[row["task"]] = taken.get(row["task"], 0) + 1
            kept.append(row)
    return kept


def cmd_push(args) -> int:
    from .bundle.hub import push_bundle_dir

    info = push_bundle_dir(args.bundle, args.repo_id, revision=args.revision, private=args.private or None,
                           commit_message=args.message, replace_readme=args.replace_readme)
    print(f"Pushed {args.bundle} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def cmd_pull(args) -> int:
    from .bundle.hub import pull_bundle

    folder = pull_bundle(args.repo_id, revision=args.revision, local_dir=args.local_dir)
    print(folder)
    return 0


def cmd_serve(args) -> int:
    from .serving.launch import serve

    if args.engine_args and args.engine != "vllm":
        raise ValueError("Arguments after `--` go to the engine: use them with --engine vllm.")
    if args.engine == "vllm":
        if args.upstream or args.ray:
            raise ValueError("--engine vllm runs vLLM with routing inside it; --upstream/--ray are other modes.")
        from .serving.engine_launch import run_vllm

        try:
            return run_vllm(args.bundle, python=args.engine_python, host=args.host, port=args.port,
                            extra_args=args.engine_args, revision=args.revision, print_only=args.print_command)
        except RuntimeError as err:  # vLLM missing or unusable
            print(f"ariadne serve: error: {err}", file=sys.stderr)
            return 2
    if args.print_command or args.engine_python:
        raise ValueError("--print-command and --engine-python go with --engine vllm.")
    try:
        serve(args.bundle, host=args.host, port=args.port, upstream=args.upstream, upstream_model=args.upstream_model,
              upstream_base_model=args.upstream_base_model, upstream_api_key=args.upstream_api_key, ray=args.ray,
              replicas=args.replicas, adapters_per_replica=args.adapters_per_replica,
              max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
              default_max_tokens=args.default_max_tokens, revision=args.revision)
    except RuntimeError as err:  # a missing optional dependency
        print(f"ariadne serve: error: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ariadne", description="Routed LoRA bundles for transformers/PEFT.")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build a bundle from a backbone, adapters and their prompts")
    build.add_argument("--backbone", required=True, help="Hub id or local folder of the backbone")
    build.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH", help="PEFT adapter")
    build.add_argument("--prompts", action="append", required=True, metavar="NAME=FILE",
                       help="prompts of an adapter (.jsonl with a text field, or .txt)")
    build.add_argument("--heldout", action="append", metavar="NAME=FILE", help="held-out prompts (for the card)")
    build.add_argument("--out", required=True, help="bundle folder to write")
    build.add_argument("--num-centroids", type=int, default=1, help="centroids per adapter (default 1)")
    build.add_argument("--distance", choices=DISTANCES, default="cosine")
    build.add_argument("--no-center", action="store_true", help="do not subtract the mean prompt embedding")
    build.add_argument("--whitening", choices=WHITENINGS, default="within",
                       help="whiten with the shrunk within-adapter covariance before scoring (default: within)")
    build.add_argument("--reject-threshold", type=float, default=None)
    build.add_argument("--routing-layer", type=routing_layer_arg, default="auto", metavar="K",
                       help="route on the base hidden state after decoder layer K (0 = the input embedding; default "
                            "auto: 8/30 of the depth, 8 for SmolLM2-135M, 0 under 12 layers)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--max-length", type=int, default=512)
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--text-field", default="text")
    build.add_argument("--revision", default=None, help="backbone revision to pin")
    build.add_argument("--include-backbone", action="store_true", help="store the backbone in base/")
    build.set_defaults(func=cmd_build)

    for name, func, helptext in (("route", cmd_route, "show where prompts are routed"),
                                 ("generate", cmd_generate, "generate with routed adapters")):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("bundle")
        command.add_argument("prompts", nargs="+")
        command.add_argument("--revision", default=None)
        command.set_defaults(func=func)
        if name == "route":
            command.add_argument("--json", action="store_true")
        else:
            command.add_argument("--max-new-tokens", type=int, default=32)
            command.add_argument("--strategy", choices=GENERATION_STRATEGIES, default=None)
            command.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")

    info = sub.add_parser("info", help="describe a bundle without loading the backbone")
    info.add_argument("bundle")
    info.add_argument("--revision", default=None)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="build a bundle of the default backbone and demo adapters, route, report")
    demo.add_argument("--out", default="ariadne-demo", help="report folder (also holds the bundle)")
    demo.add_argument("--examples-per-task", type=int, default=1, help="sample answers per task (shortest prompts)")
    scoring = demo.add_mutually_exclusive_group()
    scoring.add_argument("--questions-per-task", type=int, default=None,
                         help="multiple-choice test questions scored per task (first N in file order; default 6)")
    scoring.add_argument("--full", action="store_true", help="score every multiple-choice test question (538)")
    demo.set_defaults(func=cmd_demo)

    evaluate = sub.add_parser("eval", help="selection accuracy (and task scores) of a bundle on labelled prompts")
    evaluate.add_argument("bundle")
    evaluate.add_argument("--data", required=True, help=".jsonl(.gz) with a text and a task field per line")
    evaluate.add_argument("--text-field", default="text")
    evaluate.add_argument("--task-field", default="task")
    evaluate.add_argument("--task-map", action="append", metavar="TASK=ADAPTER", help="task name -> adapter name")
    evaluate.add_argument("--metric", choices=METRICS, default=None,
                          help="also score answers (targets / choices+answer): routed vs oracle vs base")
    evaluate.add_argument("--max-per-task", type=int, default=None)
    evaluate.add_argument("--ood", default=None, metavar="OOD.jsonl",
                          help="prompts no adapter covers (text field only): AUROC, FPR at 95%% TPR, rejects at the "
                               "calibrated threshold, score histograms")
    evaluate.add_argument("--routing", choices=ROUTING_GRANULARITIES, default="sequence",
                          help="how the 'routed' task-score column is produced (token: adapters mixed)")
    evaluate.add_argument("--reroute-every", type=int, default=None, help="token routing: re-route every n tokens")
    evaluate.add_argument("--top-k", type=int, default=None, help="token routing: adapters mixed per row")
    evaluate.add_argument("--plain", action="store_true", help="route the raw text, not the chat-formatted prompt")
    evaluate.add_argument("--out", default="ariadne-eval", help="report folder")
    evaluate.add_argument("--revision", default=None)
    evaluate.set_defaults(func=cmd_eval)

    push = sub.add_parser("push", help="upload a bundle folder to the Hub in one commit")
    push.add_argument("bundle")
    push.add_argument("repo_id")
    push.add_argument("--revision", default=None, help="branch to commit to")
    push.add_argument("--private", action="store_true")
    push.add_argument("--message", default=None, help="commit message")
    push.add_argument("--replace-readme", action="store_true", help="overwrite a README.md already on the repo")
    push.set_defaults(func=cmd_push)

    pull = sub.add_parser("pull", help="download a whole bundle from the Hub; prints its folder")
    pull.add_argument("repo_id")
    pull.add_argument("--revision", default=None)
    pull.add_argument("--local-dir", default=None)
    pull.set_defaults(func=cmd_pull)
    serve = sub.add_parser("serve", help="serve a bundle over an OpenAI-compatible HTTP API (extra: serve)")
    serve.add_argument("bundle")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch-size", type=int, default=16, help="rows per generate call (dynamic batching)")
    serve.add_argument("--max-wait-ms", type=float, default=10.0, help="longest wait to fill a batch")
    serve.add_argument("--default-max-tokens", type=int, default=256, help="chat max_tokens when omitted")
    serve.add_argument("--upstream", default=None, metavar="URL",
                       help="gateway mode: route here, generate on this OpenAI base URL (e.g. http://host:8001/v1)")
    serve.add_argument("--upstream-model", default="{adapter}", metavar="TEMPLATE",
                       help="upstream model name per adapter: '{adapter}' (vLLM), 'BASE_ID:{adapter}' (SGLang), "
                            "'org/{adapter}' (LoRAX)")
    serve.add_argument("--upstream-base-model", default="base",
                       help="upstream model name for the plain backbone (vLLM/SGLang: the served base id; LoRAX: '')")
    serve.add_argument("--upstream-api-key", default=None, help="bearer token for the upstream")
    serve.add_argument("--ray", action="store_true", help="scale out on Ray Serve (extra: ray)")
    serve.add_argument("--replicas", type=int, default=2, help="Ray mode: generation replicas")
    serve.add_argument("--adapters-per-replica", type=int, default=4,
                       help="Ray mode: adapters a replica keeps warm (serve.multiplexed max_num_models_per_replica)")
    serve.add_argument("--revision", default=None)
    serve.add_argument("--engine", choices=["local", "vllm"], default="local",
                       help="vllm: run vLLM's OpenAI server on the bundle's backbone and adapters, routing inside it "
                            "(arguments after `--` go to vLLM)")
    serve.add_argument("--engine-python", default=None, metavar="PATH",
                       help="python of the venv holding vLLM (default: this one if it has vLLM, else the cached "
                            "CPU venv of `python -m ariadne_hf.serving.vllm_env`)")
    serve.add_argument("--print-command", action="store_true",
                       help="--engine vllm: print the vLLM command (and the SGLang equivalent) without running it")
    serve.set_defaults(func=cmd_serve, engine_args=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    engine_args: list[str] = []
    if argv[:1] == ["serve"] and "--" in argv:  # `ariadne serve BUNDLE --engine vllm -- <vLLM arguments>`
        cut = argv.index("--")
        argv, engine_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if engine_args:
        args.engine_args = engine_args
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"ariadne {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
