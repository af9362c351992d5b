"""ragseg: few-shot annotation app for MONAI Label.

This file only composes tasks; everything they do lives in the ``ragseg`` library
(``lib/ragseg/label_app``). Every ``--conf`` key is documented in README.md beside this file.
"""

from __future__ import annotations

import logging

from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from ragseg import __version__
from ragseg.label_app.batch import ResumableBatchInfer
from ragseg.label_app.infer import RagSegInfer
from ragseg.label_app.services import Services
from ragseg.label_app.strategy import DiversityStrategy
from ragseg.label_app.train import DecoderTrainTask

logger = logging.getLogger(__name__)


class RagSegApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.services = Services(conf, studies, app_dir)  # parses and validates --conf once
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="ragseg",
                         description="Few-shot segmentation: label a few slices, segment the rest",
                         version=__version__)

    def init_datastore(self):
        if self.services.is_local():
            return self.services.local_datastore()  # validates labels, writes them atomically
        return self.services.remote_datastore(super().init_datastore())

    def init_infers(self):
        s = self.services
        return {"ragseg": RagSegInfer(s.components, s.label_names, s.human_label, suggestion=s.suggestion)}

    def init_trainers(self):
        t = DecoderTrainTask(self.services.components, self.services.label_names)
        return {t.name: t}

    def init_strategies(self):
        s = self.services
        return {"diversity": DiversityStrategy(s.components, s.embed_cache, s.warmer), "random": Random(),
                "first": First()}

    def init_batch_infer(self):
        return ResumableBatchInfer(self.services)

    def on_init_complete(self):
        super().on_init_complete()
        self.services.start(self.datastore())

    def on_save_label(self, image_id, label_id):
        super().on_save_label(image_id, label_id)
        return self.services.on_save_label(image_id)

    def infer(self, request, datastore=None):
        self.services.check_infer_request(request, self._infers, datastore or self.datastore())
        return super().infer(request, datastore)

    def info(self):
        meta = super().info()
        meta["ragseg"] = self.services.status()
        return meta
