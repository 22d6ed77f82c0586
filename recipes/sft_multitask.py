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


def main(script_args, training_args, model_args, dataset_args):
    import torch

    from hdpissa_trl import HDPiSSASFTTrainer
    from hdpissa_trl.scripts.data import build_mixture
    from hdpissa_trl.scripts.recipe import evaluate_before, finish_run, hdpissa_config_from_args, resolve_model

    # Model: a local dir, a tiny model built offline (demo) or a GGUF file converted once into a cache (the global
    # main process goes first: transformers' save_pretrained writes files on torch.distributed rank 0 only).
    model_path, gguf = resolve_model(script_args, training_args, model_args)
    # Data: TRL's mixture config, with per-dataset column mapping and a prompt template on top.
    dataset = build_mixture(dataset_args, script_args.column_mapping, script_args.prompt_template,
                            seed=training_args.seed)
    eval_dataset = dataset["test"] if "test" in dataset and training_args.eval_strategy != "no" else None
    # The base model is scored in fp32, the trained one in the dtype it was saved in (save_dtype).
    before = evaluate_before(model_path, script_args, training_args)
    trainer = HDPiSSASFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=eval_dataset,
        hdpissa_config=hdpissa_config_from_args(script_args, model_args, seed=training_args.seed),
        method=script_args.method,
        save_dtype=getattr(torch, script_args.save_dtype) if script_args.save_dtype else None,
    )
    finish_run(trainer, script_args, training_args, model_args, dataset_args, gguf, before)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, SFTConfig, TrlParser

    from hdpissa_trl.scripts.recipe import HDPiSSAScriptArguments

    dataclass_types = (HDPiSSAScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("sft-hdpissa", help="HD-PiSSA SFT recipe", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args, dataset_args)
