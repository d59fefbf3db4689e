"""PixelLM: vision tower -> projector -> image features placed at the image-token positions of the
text embeddings -> DeepSeek-V3-style decoder (Megatron GPTModel with MLA + MoE layer specs).

The views of a micro-batch's images arrive concatenated in sample order ([num_views, 3, T, T]) with each
image's tile grid ([num_images, 2]: cols, rows; see ``nemo_pixellm.tiling``); the image tokens fill the
positions where ``input_ids == image_token_id``, row-major over (sample, position). Each sample gets
exactly its own images; text-only samples simply contain no image tokens.
"""

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule

from nemo_pixellm import tiling
from nemo_pixellm.models import context_parallel
from nemo_pixellm.models.projector import PixelProjector
from nemo_pixellm.models.vision import VisionTower


class PixelLMModel(MegatronModule):
    def __init__(
        self,
        config,
        language_model: GPTModel,
        vision_config,
        projector_config,
        image_token_id: int,
        patch_size: int,
        base_image_size: int,
        downsample: int,
        image_position_code: bool = False,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.language_model = language_model
        self.pre_process = pre_process
        self.post_process = post_process
        self.image_token_id = image_token_id
        # Vision lives with the embeddings, on the first pipeline stage.
        self.vision_model = self.projector = None
        if pre_process:
            self.vision_model = VisionTower(vision_config, patch_size, base_image_size, pg_collection=pg_collection)
            self.projector = PixelProjector(
                projector_config, vision_config.hidden_size, downsample, image_position_code, pg_collection=pg_collection
            )
            # Whole-sequence text embeddings (images go in before the sequence-parallel scatter).
            embedding = language_model.embedding
            embedding.reduce_scatter_embeddings = embedding.word_embeddings.reduce_scatter_embeddings = False
            embedding.scatter_to_sequence_parallel = False
        self.cp_group = pg_collection.cp if pg_collection is not None and config.context_parallel_size > 1 else None
        # Megatron's schedules and DDP look these up on the model they are given.
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def image_embeddings(self, images: torch.Tensor, image_grids: torch.Tensor | None = None) -> torch.Tensor:
        """Views [v, 3, T, T] (uint8 pixels, or already normalised floats) -> [image tokens, hidden] in the order
        the image tokens appear. ``image_grids`` None: every view is a whole image (global view only)."""
        images = tiling.normalise(images)
        if image_grids is None:
            image_grids = torch.zeros(images.shape[0], 2, dtype=torch.long)
        return self.projector(self.vision_model(images), image_grids)

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None,
              image_grids: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with image features scattered into the image-token positions: [s, b, h].

        Under sequence parallelism the embeddings are built whole, images inserted, then scattered; under context
        parallelism built whole, images inserted, then cut to this rank's part (``models/context_parallel.py``).
        """
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        embeddings = self._insert_images(embeddings, input_ids, images, image_grids)
        embeddings = context_parallel.cut(embeddings, 0, self.cp_group)  # after the images: they may straddle a cut
        if self.config.sequence_parallel:
            embeddings = scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def _insert_images(self, embeddings: torch.Tensor, input_ids: torch.Tensor, images, image_grids) -> torch.Tensor:
        image_mask = input_ids == self.image_token_id  # [b, s]
        num_image_tokens = int(image_mask.sum())
        if images is None or images.shape[0] == 0:
            if num_image_tokens:
                raise ValueError(f"batch has {num_image_tokens} image tokens but no images")
            return embeddings
        features = self.image_embeddings(images, image_grids)
        if features.shape[0] != num_image_tokens:
            raise ValueError(
                f"{images.shape[0]} views give {features.shape[0]} tokens, but the batch has {num_image_tokens} "
                "image-token positions: the processor and the model disagree on the image size or layout"
            )
        # Scatter in (sample, position) order: transpose to [b, s, h] so row-major order is per sample.
        embeddings = embeddings.transpose(0, 1).clone()
        embeddings[image_mask] = features.to(embeddings.dtype)
        return embeddings.transpose(0, 1).contiguous()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        packed_seq_params=None,
        loss_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``position_ids``: [b, s] (1D) or [3, b, s] (M-RoPE t/h/w ids); None = 0..s-1. Decoding passes
        ``inference_context=LatentCache()`` (nemo_pixellm.models.mla).

        Packed rows (``packed_seq_params``, THD): the b rows run as one sequence of b * s tokens whose samples
        ``cu_seqlens_q`` delimits (Megatron's packed layout [t, 1, h]); inputs and outputs keep their [b, s]
        shapes, and what passes between pipeline stages keeps the schedule's [s, b, h] shape.

        ``loss_mask`` [b, s] with ``labels``: the losses are computed only where it is non-zero (0 elsewhere).

        Context parallelism: ``input_ids`` is the whole sequence (images go in before the cut), ``position_ids``,
        ``labels`` and ``loss_mask`` this rank's part of it (the forward step cuts them); the output is this
        rank's part."""
        rows = input_ids.shape
        if packed_seq_params is not None:
            input_ids = input_ids.reshape(1, -1)
            position_ids = position_ids.reshape(*position_ids.shape[:-2], 1, -1)
            labels = labels.reshape(1, -1) if labels is not None else None
            loss_mask = loss_mask.reshape(1, -1) if loss_mask is not None else None
            if not self.pre_process:
                received = self.language_model.decoder.input_tensor
                self.language_model.decoder.set_input_tensor(received.reshape(-1, 1, received.shape[-1]))
        decoder_input = self.embed(input_ids, images, image_grids) if self.pre_process else None
        if packed_seq_params is None and self.language_model.decodes_lean(kwargs.get("inference_context"), position_ids):
            return self.language_model.decode_step(decoder_input, position_ids, attention_mask,
                                                   kwargs["inference_context"])
        output = self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            loss_mask=loss_mask,
            packed_seq_params=packed_seq_params,
            **kwargs,
        )
        if packed_seq_params is None:
            return output
        if not self.post_process:  # hidden states [t, 1, h] -> the pipeline's [s, b, h] (same tokens)
            return output.reshape(-1, rows[0], output.shape[-1])
        return output.reshape(*rows, *output.shape[2:])  # losses [1, t] or logits [1, t, v] -> [b, s, ...]
