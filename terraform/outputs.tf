output "bucket" {
  description = "Data bucket name: use s3://<bucket>/subjects/… for inputs and s3://<bucket>/runs/… for outputs."
  value       = aws_s3_bucket.data.bucket
}

output "repository_url" {
  description = "ECR repository URL to push the image to (tags are immutable: push by version, deploy by digest)."
  value       = aws_ecr_repository.image.repository_url
}

output "job_role_arn" {
  description = "IAM role for the job's service account: the eks.amazonaws.com/role-arn annotation (k8s/overlays/eks) or AWS_ROLE_ARN (k8s/overlays/gke)."
  value       = aws_iam_role.job.arn
}

output "gpu_node_group" {
  description = "Name of the GPU node group, or null when create_gpu_node_group is false."
  value       = var.create_gpu_node_group ? aws_eks_node_group.gpu[0].node_group_name : null
}
