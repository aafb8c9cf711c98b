# Stock mmseg Segmenter ViT-S (mask transformer head, ADE20K, 512x512, slide test) with the
# backbone swapped for PMBenchViT: same arguments and weights, plus the reducer option.
_base_ = ['mmseg::segmenter/segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py']
custom_imports = dict(imports=['bench.seg.backbone', 'bench.seg.data'], allow_failed_imports=False)
model = dict(backbone=dict(type='PMBenchViT', reducer='none'))
