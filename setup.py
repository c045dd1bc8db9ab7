from setuptools import find_packages, setup

setup(
    name="finetrain",
    version="0.1.0",
    description="Distributed fine-tuning: FSDP2, DeepSpeed ZeRO, peft, document-isolated packing, rehearsal mixing",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*", "launch", "launch.*"]),
    # torch is installed first by `make setup` (CPU or CUDA build as the machine has);
    # any release satisfying this range is kept as is.
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "datasets>=3.0",
        "accelerate>=1.0",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "xxhash>=3.0",  # checkpoint checksums (several GB/s)
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "numpy>=1.24",
        "pyarrow>=15",  # Parquet read in batches (also a dependency of datasets)
        "submitit>=1.5",
        "rouge-score>=0.1.2",  # ROUGE-L of generated answers (data.eval.generate)
        "sacrebleu>=2.4",  # BLEU and chrF of generated answers (data.eval.metrics)
        "matplotlib>=3.7",  # the plots of report.html, written at the end of every run
    ],
    extras_require={
        # DeepSpeed compiles against the installed torch: pip install --no-build-isolation
        "deepspeed": ["deepspeed>=0.19.8"],
        "flash-attn": ["flash-attn>=2.6"],  # CUDA only
        # model.quantization: nf4 (QLoRA); its 4-bit kernels run on CUDA and CPU. An extra because
        # the wheel carries kernels for every CUDA/ROCm/XPU toolkit (over 100 MB) that only QLoRA uses.
        "qlora": ["bitsandbytes>=0.50"],
        "wandb": ["wandb>=0.18"],
        # logging.tensorboard: event files through torch.utils.tensorboard
        "tensorboard": ["tensorboard>=2.14"],
        # logging.mlflow: the tracking client alone (the full `mlflow` adds a server and pins pyarrow)
        "mlflow": ["mlflow-skinny>=2.10"],
        # real models and text used by the demo configs, benchmarks and tests
        "data": ["gguf>=0.10", "gensim>=4.3"],
        # import-linter: `lint-imports` checks the layers of .importlinter (make test)
        # hypothesis: the fuzz tests (tests/*/test_*_fuzz.py; FINETRAIN_FUZZ=long for the longer run)
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "import-linter>=2.1", "hypothesis>=6.100"],
        # `finetrain eval`: lm-evaluation-harness on a checkpoint, a run folder or a HF folder
        "eval": ["lm-eval>=0.4.9"],
        # bench/vs_peers.py and bench/vs_trl_dpo.py run TRL's SFTTrainer and DPOTrainer as finetrain's
        # peers; nothing else imports it
        "bench": ["trl>=1.16"],
    },
    entry_points={"console_scripts": ["finetrain=launch.cli:main"]},
)
