# Sourced by run/pretrain.sh, search.sh, finetune.sh and eval.sh: the paper-scale settings of
# every task, in this one place, and the launcher they share. Chosen by environment variables:
#   TASK     partseg (default) | s3dis | modelnet40_pt | modelnet40_pct
#   DATA     the dataset folder (default: the usual folder under data/, see data/README.md);
#            `--data-root X` on the command line wins over it
#   RUN      the run folder (default: checkpoints/$TASK in the repository), holding pretrain/,
#            search/, searched/, finetune/, finetune_distill/ and results.md
#   NPROC    processes (GPUs) per run, through torchrun (default 1); the training batch is
#            split over them, the search's and eval's batches are not (BATCH, below)
#   EPOCHS   when set, pretrain.sh's and finetune.sh's --epochs instead of the recipe's (a
#            short trial: EPOCHS=2 bash run/pretrain.sh); finetune.sh's searched/ stays at 0
#   EPISODES when set, search.sh's --episodes instead of the recipe's (below its 20 warm-up
#            episodes, every episode is a random one)
#   DRY_RUN  1: print each command instead of running it
# Extra flags given to a run/*.sh script come last, so they override the recipe's and EPOCHS /
# EPISODES. Relative paths (RUN, DATA, flags) are read from the folder the script was started
# in, as a Python script's would be.
TASK=${TASK:-partseg}
RUN=${RUN:-$REPO_ROOT/checkpoints/$TASK}
NPROC=${NPROC:-1}
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "NPROC=$NPROC: give a number of processes, 1 or more" >&2
    exit 2
fi

# HAQ (Wang et al., CVPR 2019, and its code mit-han-lab/haq): 10% of the fp32 weight bits,
# 2..8 bits per layer, 600 episodes of which 20 are random warm-up, each candidate briefly
# fine-tuned before its reward (search.py's default --finetune-steps: HAQ's one pass over
# 2 x --val-size training samples). "mix": the first layer and the classifier stay at KEEP
# bits, outside the search but charged to its budget, so search.sh and finetune.sh take the
# same KEEP.
PRESERVE=0.1
KEEP=8
SEARCH=(--preserve-ratio "$PRESERVE" --min-bit 2 --max-bit 8 --episodes 600 --warmup 20
        --keep-first-last "$KEEP")
# Centroid fine-tuning of the searched model, with and without distillation from the fp32
# model (T = 2, alpha = 0.9): our choice, not a paper's (the original repository's table has
# both rows; HAQ fine-tunes with a small learning rate).
FINETUNE=(--keep-first-last "$KEEP" --optimizer adamw --lr 1e-4 --kd-temperature 2 --kd-alpha 0.9)

# BATCH is the training batch of pretrain.sh and finetune.sh, the total over all processes (the
# papers' batch): each of the NPROC processes gets BATCH / NPROC, so the learning rates below
# hold whatever NPROC is. The search's and EVAL's --batch-size are each process's, not split:
# every process scores whole batches of that size, the very batches one process would
# (lib/distributed.ShardedSampler, lib/haq/policy_eval.reward_batches), and runs the search's
# short fine-tune of each candidate whole at that batch, for 2 x --val-size / batch steps. So
# the searched policy and the scores are one process's at any NPROC; split, the fine-tune
# would take other, smaller steps and reward other policies.
case "$TASK" in
partseg)
    # Point Transformer (Zhao et al., ICCV 2021, Sec. 4): SGD, momentum 0.9, weight decay 1e-4,
    # lr 0.05 dropped 10x at epochs 120 and 160 of 200 (--schedule step: at 60% and 80%);
    # ShapeNet part with 2048 points, normals as features.
    DATASET=shapenet_part MODEL=pt_seg BATCH=16
    PRETRAIN=(--num-points 2048 --epochs 200 --optimizer sgd --lr 0.05 --schedule step
              --weight-decay 1e-4)
    SEARCH+=(--val-size 500 --batch-size 16)
    FINETUNE+=(--epochs 30)
    EVAL=(--batch-size 16) ;;
s3dis)
    # Point Transformer, S3DIS Area 5: the paper trains 40k iterations, lr 0.5 dropped 10x at
    # 24k and 32k; its official code (POSTECH-CVLab/point-transformer, exp/s3dis/
    # pointtransformer_repro) adds 4 cm voxels, at most 80,000 points per sample, batch 16 over
    # all GPUs, SGD with momentum 0.9 and weight decay 1e-4, drops at 60% and 80%. Here: 100
    # epochs of 6,400 crops of 80,000 points = 40,000 steps of 16, dropped at 24k and 32k.
    # Inputs differ in one respect: the features are rgb and the point's place in its room
    # (PointNet's S3DIS input, lib/data/s3dis.py), where the official code feeds rgb only.
    DATASET=s3dis MODEL=pt_semseg BATCH=16
    PRETRAIN=(--num-points 80000 --epochs 100 --samples-per-epoch 6400 --optimizer sgd
              --lr 0.5 --schedule step --weight-decay 1e-4)
    SEARCH+=(--val-size 64 --batch-size 4)
    FINETUNE+=(--epochs 10 --samples-per-epoch 1600)
    EVAL=(--batch-size 4) ;;
modelnet40_pt)
    # Point Transformer, ModelNet40 (paper Sec. 4): as part segmentation, 200 epochs, lr 0.05
    # dropped 10x at 120 and 160; 1024 points. The paper gives no batch size; 32 as PCT.
    DATASET=modelnet40 MODEL=pt_cls BATCH=32
    PRETRAIN=(--num-points 1024 --epochs 200 --optimizer sgd --lr 0.05 --schedule step
              --weight-decay 1e-4)
    SEARCH+=(--val-size 1000 --batch-size 32)
    FINETUNE+=(--epochs 30)
    EVAL=(--batch-size 32) ;;
modelnet40_pct)
    # PCT (Guo et al., CVM 2021) as trained by the much-used PyTorch port Strawberry-Eat-Mango/
    # PCT_Pytorch (main.py): SGD, momentum 0.9, weight decay 5e-4, lr 0.01 with cosine
    # annealing (to 1e-4 there, to 0 here), 250 epochs, batch 32, 1024 points.
    DATASET=modelnet40 MODEL=pct_cls BATCH=32
    PRETRAIN=(--num-points 1024 --epochs 250 --optimizer sgd --lr 0.01 --schedule cosine
              --weight-decay 5e-4)
    SEARCH+=(--val-size 1000 --batch-size 32)
    FINETUNE+=(--epochs 30)
    EVAL=(--batch-size 32) ;;
*)
    echo "TASK=$TASK: unknown; use partseg, s3dis, modelnet40_pt or modelnet40_pct" >&2
    exit 2 ;;
esac
for knob in EPOCHS EPISODES; do
    if [ -n "${!knob:-}" ] && ! [[ "${!knob}" =~ ^[0-9]+$ ]]; then
        echo "$knob=${!knob}: give a whole number" >&2
        exit 2
    fi
done
# after the recipe's own, so that they win over it; the command line's extra flags come later still
[ -n "${EPOCHS:-}" ] && PRETRAIN+=(--epochs "$EPOCHS") && FINETUNE+=(--epochs "$EPOCHS")
[ -n "${EPISODES:-}" ] && SEARCH+=(--episodes "$EPISODES")
DATA_ROOT=()
[ -n "${DATA:-}" ] && DATA_ROOT=(--data-root "$DATA")
cd "$CALLER_DIR"
# the caller's folder is not put on Python's path: a lib/ of its own would shadow this one
export PYTHONSAFEPATH=1

# launch SCRIPT.py FLAGS... or launch -m MODULE FLAGS...: one process, or NPROC under
# torchrun; with DRY_RUN=1 printed only. Runs in the caller's folder (the cd above).
launch() {
    local launcher=(python) target
    if [ "$1" = -m ]; then
        target=(-m "$2")
        shift 2
    else
        target=("$REPO_ROOT/$1")
        shift
    fi
    if [ "$NPROC" -gt 1 ]; then
        # "--": torchrun would otherwise take a flag of the script's for an abbreviation of
        # one of its own (--run: "ambiguous option: --run-path"); it passes on what follows
        launcher=(torchrun --nproc-per-node "$NPROC")
        target+=(--)
    fi
    # printed shell-quoted, so that a command can be pasted back as it is (a path with a space)
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "${launcher[@]}" "${target[@]}" "$@"
        echo
    else
        { printf '+ '; printf '%q ' "${launcher[@]}" "${target[@]}" "$@"; echo; } >&2
        "${launcher[@]}" "${target[@]}" "$@"
    fi
}

# stage FOLDER SCRIPT.py FLAGS...: the stage that writes FOLDER, started again as its folder
# and FLAGS ask (lib/stage_status.py): skipped when its run has ended, continued from its last
# checkpoint when interrupted or extended (--resume: a changed setting is refused), started over
# its files when it left nothing to continue from, started when new; a folder it cannot place,
# FLAGS that change a recorded setting, or a stage still running (a live process holds its
# folder's lock: the stage started from another terminal, or, off Linux, the workers of a
# torchrun whose launcher was killed) stop the script. So a script can be run again after a
# crash.
stage() {
    local folder="$1" script="${2%.py}" status
    shift
    status=$(WORLD_SIZE="$NPROC" python -m lib.stage_status "$folder" "$script" "${@:2}")
    case "$status" in
    new) launch "$@" ;;
    finished) echo "[run] $folder: finished; skipped" >&2 ;;
    restart) launch "$@" --overwrite ;;
    resume\ *) launch "$@" --resume "${status#resume }" ;;
    *) echo "[run] ${status#refuse }" >&2; exit 2 ;;
    esac
}

# require_finished FOLDER: stop when the stage that writes FOLDER was interrupted or is still
# running, so that no stage reads an unfinished stage's result (a best.pt that a kill kept from
# being the best epoch's, a search cut short, a pretraining still writing its epochs). A stage
# not run yet (the script reading it then says the file is missing) or a result put there by
# hand, without a run's record, passes.
require_finished() {
    local state
    state=$(python -m lib.stage_status --progress "$1")
    case "$state" in
    new|ended|unknown) ;;
    refuse\ *) echo "[run] ${state#refuse }" >&2; exit 2 ;;
    *) echo "[run] $1: its run has not ended ($state); run its script again first" >&2
       exit 2 ;;
    esac
}

# The per-process batch for a total of BATCH.
per_process_batch() {
    if [ $((BATCH % NPROC)) -ne 0 ]; then
        echo "NPROC=$NPROC does not divide the total batch $BATCH of TASK=$TASK" >&2
        exit 2
    fi
    echo $((BATCH / NPROC))
}
