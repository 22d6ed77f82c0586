# Copyright the hdpissa_trl authors. Licensed under the Apache License, Version 2.0.
"""
HD-PiSSA supervised fine-tuning on a math / code / multi-task mixture (and the LoRA, PiSSA, full baselines).

# The embedded offline demo (tiny model, shipped data, 2 CPU processes, a few minutes)
```bash
accelerate launch --config_file recipes/accelerate_configs/cpu.yaml --num_processes 2 \
    recipes/sft_multitask.py --config recipes/demo/config.yaml --output_dir outputs/demo
```

# The paper's setting on 8 GPUs
```bash
accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
    recipes/sft_multitask.py --config recipes/llama-3.1-8b/multitask.yaml
```

Every YAML key can be overridden on the command line (`--method lora --lora_r 8 --max_steps 20 ...`); unknown keys
are rejected. The output directory ends up holding the merged plain model (`model.safetensors`, `config.json`,
tokenizer files), its card (`README.md`), `trainer_state.json` and, with `eval_tasks`, `eval_results.json`.
"""

import argparse
import os


def evaluate(model_or_dir, tokenizer, script_args, desc: str, dtype: str, trust_remote_code: bool = False):
    """Score ``model_or_dir`` (loaded in ``dtype``) on the configured tasks (main process only); None without tasks."""
    if not script_args.eval_tasks:
        return None
    from evaluation import evaluate_model

    print(f"Evaluating the {desc} model on {', '.join(script_args.eval_tasks)} (limit {script_args.eval_limit})")
    return evaluate_model(model_or_dir, tokenizer, tasks=script_args.eval_tasks, limit=script_args.eval_limit,
                          batch_size=script_args.eval_batch_size, max_new_tokens=script_args.eval_max_new_tokens,
                          chat=script_args.eval_chat, dtype=dtype, trust_remote_code=trust_remote_code)


def main(script_args, training_args, model_args, dataset_args):
    import torch
    from transformers import AutoTokenizer

    from hdpissa_trl import HDPiSSASFTTrainer
    from hdpissa_trl.data import build_mixture, dataset_label
    from hdpissa_trl.recipe import hdpissa_config_from_args, resolve_model_source

    # Model: a local dir, a tiny model built offline (demo) or a GGUF file converted once into a cache. The global
    # main process goes first: transformers' save_pretrained writes files on torch.distributed rank 0 only.
    with training_args.main_process_first(local=False, desc="resolving the model source"):
        model_path, gguf = resolve_model_source(model_args.model_name_or_path, script_args.gguf_file,
                                                script_args.build_tiny_model)
    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    # Data: TRL's mixture config, with per-dataset column mapping and a prompt template on top.
    dataset = build_mixture(dataset_args, script_args.column_mapping, script_args.prompt_template,
                            seed=training_args.seed)
    eval_dataset = dataset["test"] if "test" in dataset and training_args.eval_strategy != "no" else None

    is_main = training_args.process_index == 0
    before = None
    if is_main and script_args.eval_tasks and script_args.eval_before:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=training_args.trust_remote_code)
        # The base model is scored in fp32, the trained one in the dtype it was saved in (save_dtype).
        before = evaluate(model_path, tokenizer, script_args, "base", "float32", training_args.trust_remote_code)

    trainer = HDPiSSASFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=eval_dataset,
        hdpissa_config=hdpissa_config_from_args(script_args, model_args, seed=training_args.seed),
        method=script_args.method,
        save_dtype=getattr(torch, script_args.save_dtype) if script_args.save_dtype else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")

    out = training_args.output_dir
    trainer.save_model(out)
    trainer.save_state()
    card = {"run_info": {
        "base model": model_args.model_name_or_path,
        "GGUF source": f"{gguf['gguf_file']} ({gguf.get('quantization')}, sha256 {gguf['sha256'][:12]})"
        if gguf else None,
        "prompt template": script_args.prompt_template,
        "datasets": [dataset_label(d) for d in dataset_args.datasets],
    }}
    if is_main and script_args.eval_tasks:
        from evaluation import save_report

        after = evaluate(out, trainer.processing_class, script_args, "fine-tuned", "auto",
                         training_args.trust_remote_code)
        after["before"] = before
        save_report(after, os.path.join(out, "eval_results.json"))
        card.update(eval_report=after, eval_before=before)
    model_name = training_args.hub_model_id.split("/")[-1] if training_args.hub_model_id else os.path.basename(
        os.path.abspath(out))
    trainer.create_model_card(model_name=model_name, **card)
    trainer.accelerator.wait_for_everyone()

    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
        trainer.accelerator.print(f"Pushed the merged model and its card to {trainer.hub_model_id}.")
    trainer.accelerator.print(
        f"Merged model: {os.path.join(out, 'model.safetensors')}\nModel card:   {os.path.join(out, 'README.md')}\n"
        + (f"Metrics:      {os.path.join(out, 'eval_results.json')}\n" if script_args.eval_tasks else "")
        + f"Train state:  {os.path.join(out, 'trainer_state.json')}"
    )
    trainer.end() if hasattr(trainer, "end") else None


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, SFTConfig, TrlParser

    from hdpissa_trl.recipe import HDPiSSAScriptArguments

    dataclass_types = (HDPiSSAScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("sft-hdpissa", help="HD-PiSSA SFT recipe", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args, dataset_args)
