"""Runtime configuration, read from `QUOTAFLOW_*` environment variables (or a `.env` file)."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from quotaflow.core.ledger import BillingPolicy
from quotaflow.core.topics import Topics


class Settings(BaseSettings):
    """Where the servers are, how topics are named, and how traffic is billed.

    >>> s = Settings(kafka_bootstrap="127.0.0.1:9092", influx_token="s3cret")
    >>> s.topics.raw, s.topics.worker_group
    ('quotaflow.raw', 'quotaflow-streams')
    >>> "s3cret" in repr(s)
    False
    """

    model_config = SettingsConfigDict(env_prefix="QUOTAFLOW_", env_file=".env", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = Field(default="quotaflow", pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)

    influx_url: str = "http://127.0.0.1:8086"
    influx_bucket: str = "quotaflow"
    influx_org: str = "-"
    influx_token: SecretStr = SecretStr("")

    timezone: str = "UTC"
    max_rate_bytes_per_s: int = Field(default=1_250_000_000, ge=1)  # 10 Gbit/s per user
    min_interval_s: float = Field(default=60.0, gt=0)
    lateness_days: int = Field(default=3, ge=0)
    max_clock_skew_s: float = Field(default=86_400.0, gt=0)  # reports further ahead are refused

    state_dir: Path = Path("./.quotaflow-state")
    # how often the worker writes the node ledgers that changed, and acknowledges the
    # messages they hold (a crash makes it bill at most this much again, exactly)
    checkpoint_interval_s: float = Field(default=1.0, gt=0)
    # how often the worker publishes the quota states of the users that changed; a
    # status change is on `<prefix>.control` at once, whatever this is
    quota_report_interval_s: float = Field(default=10.0, gt=0)
    sink_batch_lines: int = Field(default=5000, ge=1)
    sink_flush_interval_s: float = Field(default=1.0, gt=0)

    # pipeline health: node_status and pipeline points, Prometheus endpoints
    status_interval_s: float = Field(default=10.0, gt=0)  # how often both are written
    node_interval_s: float = Field(default=60.0, gt=0)  # a node's report interval, until seen
    node_forget_days: float = Field(default=7.0, gt=0)  # silent this long: no more points
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)  # /metrics; 0: none
    sink_metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_address: str = "0.0.0.0"  # where the /metrics endpoints listen

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r}") from exc
        return value

    def to_env(self) -> dict[str, str]:
        """These settings as `QUOTAFLOW_*` variables, for starting another quotaflow process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"QUOTAFLOW_{name.upper()}"] = str(value)
        return env

    @property
    def topics(self) -> Topics:
        """The topic and consumer group names under `topic_prefix`."""
        return Topics(self.topic_prefix)

    @property
    def billing_policy(self) -> BillingPolicy:
        """The billing rules these settings choose."""
        return BillingPolicy(
            timezone=ZoneInfo(self.timezone),
            max_rate_bytes_per_s=self.max_rate_bytes_per_s,
            min_interval_s=self.min_interval_s,
            lateness_days=self.lateness_days,
        )
