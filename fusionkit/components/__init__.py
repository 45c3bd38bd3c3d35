"""The built-in components, registered through the same hooks a third-party plugin uses, all in this one module.

Each hook imports its kind's module when plugins load, so that ``fusionkit --help`` imports no torch.
"""

from __future__ import annotations

from fusionkit.hookspecs import hookimpl


def _from_config(cls):
    """The factory of a component built from its config alone (it needs nothing of the model being built)."""

    def factory(config, context):
        return cls(config)

    return factory


@hookimpl
def register_encoders(register):
    from fusionkit.components.encoders import (
        FeaturesConfig,
        FeaturesEncoder,
        SequenceCnnConfig,
        SequenceCnnEncoder,
        TowerEncoder,
        TowerEncoderConfig,
    )

    register("features", FeaturesEncoder, config=FeaturesConfig,
             description="Pre-extracted vectors, or sequences pooled by mean, stats7 or attention.")
    register("sequence_cnn", SequenceCnnEncoder, config=SequenceCnnConfig,
             description="Order-aware: 1-D convolutions over a sequence, then mean and max over its valid frames.")
    register("tower", TowerEncoder, config=TowerEncoderConfig,
             description="A trained tower of a two-tower checkpoint, as one encoder.")


@hookimpl
def register_gates(register):
    from fusionkit.components import gates

    register("attention", gates.AttentionGate, config=gates.AttentionGateConfig,
             description="Self-attention across encoder tokens, then a score per token (the seed method).")
    register("mlp", gates.MLPGate, config=gates.MLPGateConfig, description="Each encoder token scored alone by an MLP.")
    register("static", gates.StaticGate, config=gates.StaticGateConfig, description="One learned score per encoder.")
    register("uniform", gates.UniformGate, config=gates.UniformGateConfig,
             description="Equal scores: naive fusion when top_n covers every encoder.")


@hookimpl
def register_scouts(register):
    from fusionkit.components import scouts
    from fusionkit.interfaces import ScoutConfig

    register("gate", scouts.GateScout, config=ScoutConfig,
             description="The gate's own scores before the on-demand encoders run, taught its scores with every token.")
    register("value", scouts.ValueScout, config=scouts.ValueScoutConfig,
             description="A small head that predicts each on-demand encoder's loss drop per sample; decides in stages.")
    register("quality", scouts.QualityScout, config=scouts.QualityScoutConfig,
             description="Judges from each on-demand encoder's preview whether its input is good for the sample.")


@hookimpl
def register_fusions(register):
    from fusionkit.components import fusions

    register("weighted_sum", fusions.WeightedSumFusion, config=fusions.WeightedSumConfig,
             description="Gate-weighted sum of the kept encoders (order-free).")
    register("rank_concat", fusions.RankConcatFusion, config=fusions.RankConcatConfig,
             description="Kept encoders concatenated in rank order, with rank embeddings.")
    register("rank_attention", fusions.RankAttentionFusion, config=fusions.RankAttentionConfig,
             description="A small transformer over the rank-ordered kept encoders.")


@hookimpl
def register_heads(register):
    from fusionkit.components import heads

    register("presence", heads.presence_head, config=heads.MLPHeadConfig,
             description="Sigmoid per label: is each emotion present?")
    register("salience", heads.salience_head, config=heads.MLPHeadConfig,
             description="Softmax over labels: the share of each emotion.")
    register("classifier", heads.salience_head, config=heads.ClassifierHeadConfig,
             description="The official baseline head: one hidden ReLU layer, softmax over labels.")


@hookimpl
def register_combiners(register):
    from fusionkit.components import combiners

    register("product", combiners.ProductCombiner, config=combiners.ProductConfig,
             description="Normalised p_salience * p_presence^gamma.")
    register("mean", combiners.MeanCombiner, config=combiners.MeanConfig,
             description="Mean of salience and normalised presence.")
    register("salience_only", combiners.SalienceOnlyCombiner, config=combiners.SalienceOnlyConfig,
             description="The salience (or classifier) head alone.")
    register("presence_only", combiners.PresenceOnlyCombiner, config=combiners.PresenceOnlyConfig,
             description="The normalised presence head alone.")


@hookimpl
def register_decoders(register):
    from fusionkit.components import decoders

    register("blemore", decoders.BlemoreDecoder, config=decoders.BlemoreDecoderConfig,
             description="The official BlEmoRE alpha/beta rule on the combined distribution.")
    register("presence_salience", decoders.PresenceSalienceDecoder, config=decoders.PresenceSalienceDecoderConfig,
             description="Present set from the presence head, ratio from the salience head.")


@hookimpl
def register_datasets(register):
    from fusionkit.components import datasets

    register("uci-mfeat", datasets.UciMfeat, config=datasets.UciMfeatConfig,
             description="UCI Multiple Features digits as a blended task: six real encoders of unequal quality.")
    register("blemore", datasets.BlemoreRelease, config=datasets.BlemoreConfig,
             description="A BlEmoRE release as the official code writes it: static .npz, flat .npy folders, metadata CSVs.")
    register("synthetic", datasets.Synthetic, config=datasets.SyntheticConfig,
             description="Fast synthetic blended data for tests.")
    register("cmudict", datasets.Cmudict, config=datasets.CmudictConfig,
             description="English spelling and pronunciation as paired symbol sequences (retrieval, distillation).")


@hookimpl
def register_adaptation_losses(register):
    from fusionkit.components import adaptation as a

    register("mmd", _from_config(a.MMDLoss), config=a.MMDConfig,
             description="Multi-kernel Gaussian MMD (median-heuristic bandwidths).")
    register("coral", _from_config(a.CoralLoss), config=a.CoralConfig,
             description="CORAL: match feature covariances (and means).")
    register("dann", a.DannLoss, config=a.DannConfig, description="Domain discriminator behind gradient reversal (DANN).")
    register("entropy", _from_config(a.EntropyLoss), config=a.EntropyConfig,
             description="Entropy minimisation of target predictions, both heads.")


@hookimpl
def register_distill_losses(register):
    from fusionkit.components import distillation as d

    register("kd", _from_config(d.KD), config=d.KDConfig,
             description="Temperature-scaled KL of label probabilities (fusion).")
    register("fd", _from_config(d.FD), config=d.FDConfig,
             description="Squared distance of student and teacher embeddings.")
    register("crd", _from_config(d.CRD), config=d.CRDConfig,
             description="CLIP-KD: KL between teacher and student cross-modal similarity distributions.")
    register("icl", _from_config(d.ICL), config=d.ICLConfig,
             description="CLIP-KD: contrastive loss of student embeddings against the teacher's other modality.")
    register("rkd", _from_config(d.RKD), config=d.RKDConfig,
             description="RKD: distance and angle relations of each embedding.")
    register("vrd", _from_config(d.VRD), config=d.RelationConfig,
             description="CLIP-RD vertical: the first modality's teacher-student distribution pulled to the second's.")
    register("xrd", _from_config(d.XRD), config=d.RelationConfig,
             description="CLIP-RD cross: the two cross-modal teacher-student distributions pulled together.")


@hookimpl
def register_distill_presets(register):
    from fusionkit.components import distillation as d

    for name, losses in d.DISTILL_PRESETS.items():
        register(name, list(losses), description=d.PRESET_DESCRIPTIONS[name])
