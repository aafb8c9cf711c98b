# Proxy Segmenter: the ViT-T config narrowed (D=128, 4 heads, 12 blocks, patch 16) on 256x256
# crops (16x16 token grid) and the embedded 6-class proxy set; trains from scratch on a CPU in
# a few minutes.  Same backbone/head types and slide test as the real configs.
_base_ = ['./segmenter_vit-t_pmbench_ade20k-512x512.py']
crop_size = (256, 256)
num_classes = 6
embed = 128
heads = 4
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=crop_size, embed_dims=embed, num_heads=heads, drop_path_rate=0.0),
    decode_head=dict(in_channels=embed, channels=embed, embed_dims=embed, num_heads=heads,
                     num_classes=num_classes, drop_path_rate=0.0),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(240, 240)))
dataset_type = 'PMBenchProxySegDataset'
data_root = '.cache/proxy_seg/default-seed0'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.9),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(type=dataset_type, data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(type=dataset_type, data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999)),
                     clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, begin=0, end=50, by_epoch=False),
    dict(type='CosineAnnealingLR', T_max=250, eta_min=1e-5, begin=50, end=300, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=300, val_interval=300)
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=25, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=300, max_keep_ckpts=1),
    visualization=dict(type='SegVisualizationHook', draw=False))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
