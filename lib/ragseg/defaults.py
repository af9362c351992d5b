"""Every tunable number of the package, in one place.

Modules import their defaults from here so that the CLI, the MONAI Label app config and the tests
agree, and so a reader can see every magic number at once.
"""

from __future__ import annotations

# --- volumes -------------------------------------------------------------------------------
# Slicing axis in the image's voxel array after reorientation to RAS: 2 = axial.
DEFAULT_AXIS = 2
AXIS_NAMES = {"sagittal": 0, "coronal": 1, "axial": 2}

# CT window presets as (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_CT_WINDOW = "abdomen"
# MR (and any modality without calibrated units): clip to these percentiles of the non-zero
# voxels, then scale to [0, 1].
MR_PERCENTILES = (0.5, 99.5)

# ImageNet statistics: both SAM 2 and DINOv2 were trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --- models ----------------------------------------------------------------------------------
SAM2_IMAGE_SIZE = 1024  # official SAM 2.1 input size
DINOV2_IMAGE_SIZE = 224  # DINOv2 input for retrieval (multiple of its 14-pixel patch)
DIVERSE_SUPPORTS = True  # spread the k supports over labeled images (pipeline.diverse_top_k)
DIVERSE_CANDIDATES = 8  # ... chosen among the k * this most similar slices
DEFAULT_K = 3  # supports retrieved per label
MAX_K = 16  # SAM 2 attends to at most 16 object pointers; more supports add cost, not pointers
MASK_THRESHOLD = 0.0  # logit threshold for a binary mask (sigmoid 0.5)
NESTED_WINS = True  # label rule: a structure enclosed by another's mask wins their overlap (rings)...
ENCLOSED_FRACTION = 0.75  # ...for pairs the pool shows enclosed: this share of the inner outline is the outer label
NESTED_FRACTION = 0.8  # "enclosed" prediction: at least this fraction of the inner mask inside the outer one
STRUCTURE_FRACTION = 0.9  # one 3D structure: largest component holds this share in every labeled volume
STRUCTURE_MIN_SLICES = 3  # consecutive labeled slices a volume needs to count as evidence for that
KEEP_LARGEST_COMPONENT = True  # predicted volumes keep the largest component of one-structure labels
STRUCTURE_KEEP_RATIO = 0.5  # ...and any other at least this share of its size (which is right is a guess)
EMBED_BATCH = 16  # slices per DINOv2 forward pass
ENCODE_BATCH = 4  # slices per SAM 2 image-encoder pass

# --- index -----------------------------------------------------------------------------------
APPROX_THRESHOLD = 100_000  # switch from exact to IVF above this many stored slices
IVF_NPROBE = 32
HNSW_M = 32
HNSW_EF_SEARCH = 128
SEARCH_OVERFETCH = 8  # fetch k * this candidates before filtering by label / exclusions
FAISS_MAX_K = 2048  # FAISS GPU indexes refuse k above this; past it, filtered slices are scored exactly
LOCK_TIMEOUT_S = 120.0

# --- DICOMweb (PACS) --------------------------------------------------------------------------------
# dicomweb-client retries every failed request (a refused connection too) 5 times, waiting 2, 4, 8,
# 16 s: an infer or save during a PACS outage hung 30 s before its 503. Attempts per request and the
# first wait (doubling after each attempt): 3 and 0.5 s ride out a PACS restart's blip and answer an
# outage in ~1.5 s.
PACS_ATTEMPTS = 3
PACS_RETRY_WAIT_S = 0.5

# --- process memory (ragseg.allocator) --------------------------------------------------------------
# glibc returns freed blocks above 128 KiB to the kernel, so CPU inference re-faults every activation
# buffer; above these sizes it still does (a huge volume's array is still unmapped when freed)
MALLOC_TRIM_THRESHOLD = 1 << 30
MALLOC_MMAP_THRESHOLD = 1 << 30
MALLOC_ARENA_MAX = 1  # a thread's own arena unmaps its heaps when free: one arena keeps them all

# --- caches ----------------------------------------------------------------------------------
MEMORY_CACHE_ITEMS = 512  # support memories kept in RAM (about 130 KB each at 512 px)
FEATURE_CACHE_BYTES = 1 << 30  # query-slice encoder features kept across requests (~4 MB/slice at 512)

# --- LiteMedSAM backend and prototype prompts ------------------------------------------------------
APART_FRACTION = 0.1  # labels touching in at most this fraction of the slices with both lie "apart"
LOCATION_PRIOR = 2  # embedding cells a query region may lie from the supports' structure (None: off)
# largest move (cells, each axis) of the supports' structure onto the query's anatomy that the
# location prior also allows (prototypes.anatomy_shift); a fine-tuned decoder uses it when its
# labeled pool's cross-patient episodes show it finds the structure better (fewshot.choose_prior_shift)
PRIOR_SHIFT = 8
PRIOR_SHIFT_MIN_GAIN = 0.01  # mean box IoU the move must add on the pool's episodes to be used
FINETUNE_PRIOR_SHIFT: int | None = None  # fine-tuned decoders: None = choose on the pool, 0 = never move
# A coarse region may keep at most a multiple of the supports' structure area (most foreground-like
# cells first). Training-free, 4 labeled patients, no cap -> 1.5x: hippocampus 0.506 -> 0.630,
# CT 0.783 -> 0.789, but ACDC 0.514 -> 0.455 and MS 0.065 -> 0.034; choosing the factor on the
# supports (leave one out) gave hippocampus 0.524, ACDC 0.477. So off by default, an option for
# structures whose surroundings look like them (docs/results.md, "Region size cap").
REGION_AREA_CAP: float | None = None  # a factor, or None (off)
MAX_REGIONS = 1  # coarse regions prompted per label and slice (one box each); more for lesions
# what scores a query cell as "the structure" for box prompts: "prototype" (cosine to the supports'
# foreground minus background mean) or "linear" (a logistic regression fitted on the labeled pool's
# cells, ragseg.cellscore). MS lesions, training-free, 2 labeled patients, no location prior, 16
# regions: 0.352 vs 0.094 with "prototype" (docs/results.md, "the linear cell score fitted on the
# labeled pool"); not measured on other data sets yet, so not the default
REGION_SCORE = "prototype"
CELL_SCORE_INTENSITY_WEIGHT = 4.0  # the cell-intensity feature's scale next to the unit-length embedding
CELL_SCORE_C = 1.0  # inverse L2 strength of the cell regression (as scikit-learn's C)
CELL_SCORE_ITERS = 100  # L-BFGS iterations per fit
CELL_SCORE_MIN_COVER = 0.25  # a cell is the structure's when it covers at least this fraction of it
CELL_SCORE_MIN_INTENSITY = 0.02  # darker cells (air, padding) are left out of the fit
CELL_SCORE_MAX_CELLS = 20000  # cells per fit at most (~2-3 s of L-BFGS on 2 CPU threads)
CELL_SCORE_MAX_SUPPORTS = 128  # labeled slices per fit at most (each is encoded once: ~2 MB, ~1 s on a CPU)
CELL_SCORE_FITS_KEPT = 16  # fitted scores kept per engine (one per label and labeled-pool version)
# a cell the linear score calls the structure stays so only when its nearest cell (Euclidean, same
# features) among the fit set's structure cells and the retrieved supports' tissue background is a
# structure cell: retrieval brings the query's own anatomy as the background to beat (MS lesions)
CELL_SCORE_NN_VETO = True
LITEMEDSAM_POOL = 4  # retrieval embedding = LiteMedSAM embedding average-pooled to this grid
LITEMEDSAM_ENCODE_BATCH = 1  # TinyViT on CPU is fastest per slice at batch 1 (measured, #4)

# --- supervised baselines (evaluate: unet, dynunet) ------------------------------------------------
# side the baselines' slices are resized to; None: the labeled pool's median long side rounded up to
# a multiple of 32, at most BASELINE_MAX_SIZE (nnU-Net trains near the data's own resolution). A
# fixed 256 blew the 35 x 51 px hippocampus crops up 5x: UNet 0.681 there vs 0.794 at 64 px, and
# DynUNet's 4.7 s iterations left it empty (docs/results.md, "Baselines at the pool's resolution").
BASELINE_SIZE: int | None = None
BASELINE_MAX_SIZE = 256  # the automatic side's cap (CPU time per iteration grows with its square)
BASELINE_BATCH = 8
BASELINE_MAX_ITERS = 4000
BASELINE_TIME_LIMIT_S = 600.0  # wall-clock cap on one training
BASELINE_VAL_EVERY = 50  # iterations between early-stopping validations
BASELINE_PATIENCE = 10  # validations without improvement before stopping
# a validated state "finds" a class when its Dice on the validation slices reaches this; only states
# that find every class are kept. Measured on one hippocampus subject: untrained states (iteration
# 10) score 0.01-0.16 per class by chance overlap; DynUNet then predicts background everywhere for
# 50-150 iterations, and one class alone for up to 100 more, while learned classes score 0.3-0.9.
BASELINE_MIN_CLASS_DICE = 0.2
# extra wall-clock a baseline may train past its cap while none of its states has found every class
# yet: a net stopped in its all-background phase predicts nothing (DynUNet on that subject, capped
# under a shared CPU, gave 0.000 on every query of the hippocampus learning curve's seed 1)
BASELINE_OVERRUN_S = 300.0

# --- patients ---------------------------------------------------------------------------------------
# an image id's patient: the first group of this regex (ACDC: patient001_frame01 -> patient001), so
# two frames of one heart are never on both sides of an evaluation nor support and query of one
# training episode
PATIENT_PATTERN = r"^(.+?)(?:_frame\d+)?$"

# --- few-shot decoder fine-tuning ------------------------------------------------------------------
# 50 epochs of 64 episodes: at 20 the training-episode Dice was still rising on both cross-patient
# pools (ACDC, hippocampus); 40 cost hippocampus 0.755 -> 0.713 (ACDC 0.792 -> 0.787). 50 fits the
# 10-minute budget for 4 ACDC patients on 2 CPU cores (522 s on one machine; 640-646 s on a slower
# one before episodes normalized each slice once, 451 s there at 40 epochs after; 422 s at 50 with
# bf16 autocast, FINETUNE_PRECISION)
FINETUNE_EPOCHS = 50
FINETUNE_MAX_EPISODES = 64  # episodes per epoch at most (one step ~0.3 s per episode on 2 CPU threads)
FINETUNE_LR = 1e-4
# 4 episodes per step instead of 8: 12.0 vs 14.4-15.6 s per ACDC epoch side by side (the decoder's
# activations of 4 x 4096 image tokens stay in cache), twice the updates, same or better Dice (4 labeled,
# seed 0: ACDC 0.792 vs 0.793, hippocampus 0.755 vs 0.748; docs/results.md, "Where ACDC still loses")
FINETUNE_BATCH = 4
# "auto": the decoder's forward passes under bfloat16 autocast where the hardware multiplies it
# natively (ragseg.precision), else float32. On an AVX512-BF16 CPU (2 threads) an ACDC epoch took
# 9.0-9.8 s vs 13.1 s (ACDC fine-tuning 422 vs 661 s). Dice, 4 labeled, served path, bf16 vs float32:
# hippocampus 0.765 / 0.731 vs 0.755 / 0.748 (seeds 0 / 1), ACDC 0.787 vs 0.792, with one augmented
# copy 0.810 / 0.799 vs 0.820 / 0.813: within the seeds' spread, leaning lower on ACDC
# (docs/results.md, "bfloat16 fine-tuning")
FINETUNE_PRECISION = "auto"
FINETUNE_PRECISIONS = ("auto", "bf16", "float32")
FINETUNE_BOX_JITTER = 0.1  # training boxes moved by up to this fraction of their size
# shifts of up to 4 cells gave the same held-out Dice as none once states are averaged (hippocampus
# 0.713 vs 0.713 over 2 seeds, ACDC 0.804 vs 0.799 over 1; docs/results.md), so they stay off
FINETUNE_SHIFT = 0  # training batches moved by up to this many embedding cells (0: off)
# the mean of the last 10 epoch-end states beat the best-training-Dice epoch on held-out hippocampus
# subjects by 0.023 over 3 seeds (0.701 vs 0.678; -0.008 / +0.038 / +0.040), equal on ACDC (2 seeds)
FINETUNE_AVERAGE_LAST = 10  # decoder kept = mean of the last this many epochs' states (0: best epoch's)
# served, a label's supports are the labeled slices most like the query; episodes drawn that way
# teach the decoder the pairs it will see. All of them, 4 labeled, 2 fine-tuning seeds each:
# hippocampus 0.677 -> 0.761 on one pool, 0.701 -> 0.747 on another; ACDC 0.798 -> 0.789; half of
# them gave hippocampus only 0.697 (docs/results.md, "Training episodes with retrieved-like supports")
FINETUNE_RETRIEVED = 1.0  # share of episodes whose supports are drawn like retrieval (0: all random)
# 4 (more varied supports) gave ACDC 0.769 vs 0.793 with 2 (seed 0)
FINETUNE_RETRIEVED_POOL = 2  # a retrieved-like draw takes k of the k x this most similar candidates

# augmented copies (rotation, scale, shift, intensity; ragseg.augment) of every labeled slice framed by
# background (air around the body), encoded once with the pool (~1.1 s per slice on 2 CPU threads).
# Crops that are tissue to their edge get none: what lies beyond their frame would be invented. One copy
# lifts ACDC (4 labeled, all background-framed) to 0.810 / 0.799 over two seeds with bf16 (0.787 / 0.783
# without; 455-494 s + ~87 s encoding the copies) and 0.820 / 0.813 in float32; hippocampus crops (all
# tissue-framed) are not copied - copying them cost 0.687 (zeros beyond the frame) or 0.743 / 0.710 (the
# edge continued) vs 0.765 / 0.731 without (docs/results.md, "Augmented copies"); copies that zoom in so
# nothing beyond the frame shows gave 0.741 vs 0.755 over two pools ("Copies of tissue-framed crops").
FINETUNE_AUGMENT = 1
FINETUNE_MAX_AUGMENT = 8  # what the train task accepts (each copy is one more encode per labeled slice)

# image branch of the fine-tuned decoder (ragseg.fewshot.ImageBranch): the query slice itself, at
# 4x the embedding grid, through a small convolutional net into the decoder's dense prompt (last
# layer zero-initialised: untrained, it adds nothing). The frozen embedding of a small crop blown up
# to the model's input loses the intensity edges the decoder needs; with the branch the decoder fits
# its own hippocampus pool better (training Dice 0.786 -> 0.816) and the queries follow: 0.755 ->
# 0.794 over two pools of 4 subjects. ACDC (slices about the model's size) does not gain (0.820 /
# 0.720 vs 0.815 / 0.736 over two pools) and fine-tuning takes ~30% longer, past the 10-minute budget
# (docs/results.md, "An image branch for the fine-tuned decoder"). So "auto": on for pools of small
# slices, where the model sees each slice pixel as 4 or more input pixels (its embedding grid as fine
# as the slice or finer), i.e. a median long side of at most IMAGE_BRANCH_MAX_SIDE px.
FINETUNE_IMAGE_BRANCH = "auto"  # "auto", True or False
FINETUNE_IMAGE_BRANCHES = ("auto", "on", "off")  # how the CLI spells it
IMAGE_BRANCH_MAX_SIDE = 64  # LiteMedSAM: 256 px input / 4; hippocampus crops ~51 px, ACDC 154-256 px
IMAGE_BRANCH_WIDTH = 32  # channels of its full-resolution layer (twice as many after the 4x stride)
# several fine-tunings of one pool, their logits averaged (ragseg.fewshot.DecoderEnsemble): member j
# trains with seed + j * FINETUNE_MEMBER_SEED_STEP (its augmented copies drawn with that seed too).
# One training's queries move by +-0.02-0.04 with its seed alone (hippocampus, 4 subjects: 0.748 to
# 0.788 on one pool); 3 members gave 0.798 over two pools against 0.790 for the same three served
# alone, at 3x the fine-tuning time (docs/results.md, "Several fine-tunings averaged"). Off by
# default: 3 x ~8 min is past the 10-minute budget.
FINETUNE_MEMBERS = 1
FINETUNE_MAX_MEMBERS = 8  # what the train task accepts
FINETUNE_MEMBER_SEED_STEP = 100

# --- Ray scale-out (ragseg.scale) ------------------------------------------------------------------
RAY_MAX_RETRIES = 3  # resubmissions of a volume whose worker process died
RAY_MAX_THREADS = 4  # default torch threads per CPU actor (more actors beat more threads per actor)
RAY_STARTUP_TIMEOUT_S = 900.0  # actors must have loaded their models by then
RAY_PROBE_INTERVAL_S = 0.5  # how often a restarting actor is asked whether it is back
RAY_INDEX_FLUSH = 64  # volumes merged into the index per transaction during a Ray index build
