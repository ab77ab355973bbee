#!/usr/bin/env bash
# CARE + GRPO with OpenRLHF 0.11.2 on one 8-GPU node (hybrid engine: actor, reference and vLLM
# colocated, sleep mode), or on a multi-node Ray cluster (NODES > 1, see README.md).
# UNTESTED ON GPUs: written against the 0.11.2 flag set (checked by the CPU tests' --help run),
# never launched on a GPU machine from this repository.
#
#   MODEL=Qwen/Qwen3-4B-Base TASK=math bash training/openrlhf/grpo_care.sh [--care.* overrides]
#
# Environment: MODEL (HF id or local path; Qwen3-{1.7B,4B,8B}-Base), TASK (math | kk), DATA_DIR
# (the prepare_data.py output, default data/openrlhf), RUN (output dir), NODES (default 1),
# GPUS_PER_NODE (8), VLLM_TP (vLLM tensor parallel size; default 1 for <= 4B, 2 for 8B),
# STRATEGY (care), RAY_ADDRESS (submit to a running cluster with `ray job submit` when set).
set -euo pipefail
MODEL=${MODEL:?set MODEL, e.g. Qwen/Qwen3-4B-Base}
TASK=${TASK:-math}
DATA_DIR=${DATA_DIR:-data/openrlhf}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
STRATEGY=${STRATEGY:-care}
RUN=${RUN:-runs/openrlhf/$(basename "$MODEL")-$TASK-$STRATEGY}
# Absolute paths: with RAY_ADDRESS the entrypoint runs under Ray's job supervisor on the head node,
# not in this shell's directory, so a relative data, checkpoint or label-store path would resolve
# elsewhere (shared storage at the same path on every node is still the caller's to provide).
DATA_DIR=$(realpath -m "$DATA_DIR")
RUN=$(realpath -m "$RUN")
case "$MODEL" in *8B*) VLLM_TP=${VLLM_TP:-2} ;; *) VLLM_TP=${VLLM_TP:-1} ;; esac
GPUS=$((NODES * GPUS_PER_NODE))
ENGINES=$((GPUS / VLLM_TP))
case "$MODEL" in *1.7B*) ALPHA=${ALPHA:-0.10} ;; *) ALPHA=${ALPHA:-0.25} ;; esac  # 0.10 for small models

if [ "$TASK" = math ]; then
  # paper: B 64 prompts, G 8, lr 1e-6, max response 4000, 2 epochs over DAPO-17k, no KL
  DATA=(--data.prompt_dataset "$DATA_DIR/dapo17k_train.jsonl" --data.input_key prompt
        --data.label_key label --data.apply_chat_template
        --eval.dataset "$DATA_DIR/eval_math.jsonl")
  EPISODES=2
  KL=(--algo.kl.init_coef 0)
elif [ "$TASK" = kk ]; then
  # paper: K&K 3-7 people, 3 epochs, KL 0.01 (as a k3 loss, so CARE's weights stay exact)
  DATA=(--data.prompt_dataset "$DATA_DIR/kk_3to7_train.jsonl" --data.input_key prompt
        --data.label_key label --eval.dataset "$DATA_DIR/eval_kk.jsonl")
  EPISODES=3
  KL=(--algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef 0.01)
else
  echo "TASK must be math or kk" >&2; exit 2
fi
REWARD=$(python -c "import care_ext.integrations.openrlhf.reward_func as m; print(m.__file__)")

# --care.drop_mode remove (a true drop) saves work only when one rollout is several optimizer
# steps: pass e.g. --train.batch_size 128 after it (512 = 64 x 8 is one step). Async mode: append
# --train.async_enable (OpenRLHF then colocates only the DeepSpeed models).
# --care.worker_reduce first_layer applies the classifiers' first layers on the policy GPUs and
# ships 384 floats per sample instead of 2H (pays off at large B x G; docs/openrlhf.md).
ARGS=(
  --actor.model_name_or_path "$MODEL"
  --actor.num_nodes "$NODES" --actor.num_gpus_per_node "$GPUS_PER_NODE"
  --ref.num_nodes "$NODES" --ref.num_gpus_per_node "$GPUS_PER_NODE"
  --vllm.num_engines "$ENGINES" --vllm.tensor_parallel_size "$VLLM_TP"
  --vllm.gpu_memory_utilization 0.5 --vllm.enable_sleep --ds.enable_sleep --train.colocate_all
  --ds.zero_stage 3 --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2
  --actor.gradient_checkpointing_enable --ds.packing_samples
  --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 8
  --rollout.batch_size 64 --train.batch_size 512 --rollout.micro_batch_size 16 --train.micro_batch_size 4
  --rollout.max_new_tokens 4000 --data.max_len 5024 --rollout.temperature 1.0
  --actor.adam.lr 1e-6 --train.num_episodes "$EPISODES" --train.max_epochs 1
  --reward.remote_url "$REWARD"
  --eval.steps 20 --eval.temperature 0.6 --eval.n_samples_per_prompt 4
  --ckpt.path "$RUN/ckpt" --ckpt.save_steps 20 --ckpt.max_num 3 --ckpt.load_enable
  --ckpt.output_dir "$RUN/final" --logger.tensorboard_dir "$RUN/tb"
  "${KL[@]}" "${DATA[@]}"
  --care.strategy "$STRATEGY" --care.budget_frac 0.2 --care.alpha "$ALPHA" --care.warmup_steps 20
  --care.oracle gold --care.label_store "$RUN/care/labels.sqlite" --care.state_dir "$RUN/care"
  --care.drop_mode zero --care.device cpu
  "$@"
)
mkdir -p "$RUN"
if [ -n "${RAY_ADDRESS:-}" ]; then
  # multi-node / existing cluster: care_ext and openrlhf==0.11.2 must be installed on every node
  ray job submit --address="$RAY_ADDRESS" -- python3 -m care_ext.integrations.openrlhf "${ARGS[@]}"
else
  python3 -m care_ext.integrations.openrlhf "${ARGS[@]}"
fi
