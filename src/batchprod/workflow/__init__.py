"""Generic workflows: jobs from quanta, clustering, resources and the final job."""

from batchprod.workflow.clustering import ClusterSpec, cluster_quanta, workflow_from_config
from batchprod.workflow.generic import FinalJob, GenericWorkflow, JobGroup, Resources

__all__ = ["ClusterSpec", "FinalJob", "GenericWorkflow", "JobGroup", "Resources", "cluster_quanta", "workflow_from_config"]
