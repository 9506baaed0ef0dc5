variable "region" {
  description = "AWS region for the bucket, the ECR repository and the node group."
  type        = string
  default     = "us-east-1"
}

variable "name" {
  description = "Name prefix of every resource (bucket, repository, role, node group)."
  type        = string
  default     = "sdft"
}

variable "bucket_name" {
  description = "Name of the data bucket (instance images, outputs, checkpoints); default \"<name>-data-<account id>\"."
  type        = string
  default     = null
}

variable "checkpoint_expiry_days" {
  description = "Days after which objects under checkpoints/ are deleted (a finished run removes its own; this catches abandoned ones)."
  type        = number
  default     = 14
}

variable "oidc_provider_arn" {
  description = "ARN of the IAM OIDC provider of the cluster whose service account assumes the job role (EKS: the cluster's IRSA provider; GKE: a provider for the cluster's issuer)."
  type        = string
}

variable "oidc_provider_url" {
  description = "Issuer URL of that OIDC provider, with or without https:// (e.g. oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE)."
  type        = string
}

variable "namespace" {
  description = "Kubernetes namespace of the job's service account."
  type        = string
  default     = "sdft"
}

variable "service_account" {
  description = "Name of the job's Kubernetes service account (k8s/base/serviceaccount.yaml)."
  type        = string
  default     = "sdft"
}

variable "readable_prefixes" {
  description = "Bucket prefixes the job may read (instance images, batch files, base models)."
  type        = list(string)
  default     = ["subjects/", "batches/", "models/"]
}

variable "writable_prefixes" {
  description = "Bucket prefixes the job may read, write and delete (outputs, checkpoints, class images)."
  type        = list(string)
  default     = ["runs/", "checkpoints/"]
}

variable "create_gpu_node_group" {
  description = "Create an EKS managed node group of GPU instances in cluster_name."
  type        = bool
  default     = false
}

variable "cluster_name" {
  description = "EKS cluster that receives the GPU node group (only with create_gpu_node_group)."
  type        = string
  default     = ""
}

variable "subnet_ids" {
  description = "Subnets of the GPU node group (only with create_gpu_node_group)."
  type        = list(string)
  default     = []
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group."
  type        = list(string)
  default     = ["g5.xlarge"]
}

variable "gpu_capacity_type" {
  description = "ON_DEMAND or SPOT capacity for the GPU node group (SPOT pairs with k8s/components/spot)."
  type        = string
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "SPOT"], var.gpu_capacity_type)
    error_message = "gpu_capacity_type must be ON_DEMAND or SPOT."
  }
}

variable "gpu_max_nodes" {
  description = "Upper bound of the GPU node group (it scales from zero)."
  type        = number
  default     = 4
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = { project = "sdft" }
}
