"""A real Orthanc PACS (Debian packages ``orthanc`` + ``orthanc-dicomweb``) on loopback for tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from .server_utils import free_port

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = next((p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                                    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so") if Path(p).exists()), None)
MISSING = None if ORTHANC and DICOMWEB_PLUGIN else (
    "Orthanc with the DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)")


class Orthanc:
    """Orthanc with a config written here: HTTP on a free loopback port, no DICOM port, no auth."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.dir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Orthanc:
        (self.dir / "db").mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "ragseg-test", "StorageDirectory": str(self.dir / "db"), "IndexDirectory": str(self.dir / "db"),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [DICOMWEB_PLUGIN], "StableAge": 1,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }
        (self.dir / "orthanc.json").write_text(json.dumps(cfg))
        self._log = open(self.dir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(self.dir / "orthanc.json")], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.dir / 'orthanc.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/system", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def stow(self, files: list[Path]) -> None:
        """Upload DICOM files with STOW-RS."""
        from dicomweb_client.api import DICOMwebClient
        from pydicom import dcmread

        DICOMwebClient(url=self.dicomweb).store_instances([dcmread(str(f)) for f in files])

    def series(self, modality: str | None = None) -> list[dict]:
        from dicomweb_client.api import DICOMwebClient

        flt = {"Modality": modality} if modality else {}
        return DICOMwebClient(url=self.dicomweb).search_for_series(search_filters=flt)
