"""Evaluation: attribute classifiers, text alignment and FID in a classifier's feature space.

    shapes_classifier   a small CNN reading (color, shape) counts, sizes and centroids from
                        64x64 shapes images, shipped trained two ways: the alignment judge
                        (assets/shapes_judge.safetensors) and the FID's feature network
                        (assets/shapes_classifier.safetensors)
    alignment           judge(prompt, image) and text_alignment(prompts, images) for shapes
                        captions; evaluation_prompts() away from the training captions
    fid                 Fréchet distance between Gaussian fits of feature sets (no scipy)
    evaluate            evaluate_shapes_model(pipe, prompts): generate, judge, FID
    digits_classifier   a digits CNN (16x16) and evaluate_digits_sampler(labels -> images)
    cli                 `ldmkit eval` (add_eval / run_eval)

The classifiers' weights are small and packaged, so evaluation never trains; a missing asset is
retrained (seeded) and cached. Library code here never imports the CLI or the trainer.
"""

from .alignment import evaluation_prompts, judge, judge_many, text_alignment
from .digits_classifier import evaluate_digits_sampler, load_digits_classifier
from .evaluate import evaluate_shapes_model, real_images_for_prompts, score_shapes_images, shapes_fid
from .fid import fid_from_features, frechet_distance, gaussian_stats
from .shapes_classifier import detect, load_shapes_classifier, load_shapes_judge

__all__ = [
    "detect", "evaluate_digits_sampler", "evaluate_shapes_model", "evaluation_prompts", "fid_from_features",
    "frechet_distance", "gaussian_stats", "judge", "judge_many", "load_digits_classifier",
    "load_shapes_classifier", "load_shapes_judge", "real_images_for_prompts", "score_shapes_images", "shapes_fid",
    "text_alignment",
]
