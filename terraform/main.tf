data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  bucket      = coalesce(var.bucket_name, "${var.name}-data-${data.aws_caller_identity.current.account_id}")
  oidc_issuer = trimprefix(var.oidc_provider_url, "https://")
}

# --- Data bucket: instance images in, weights and run records out ----------------------------

resource "aws_s3_bucket" "data" {
  bucket = local.bucket
}

resource "aws_s3_bucket_versioning" "data" {
  bucket = aws_s3_bucket.data.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "aws:kms"
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket                  = aws_s3_bucket.data.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  # Uploads interrupted by a preempted pod leave parts that cost money and are never listed.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 2
    }
  }

  # A successful run deletes its checkpoints; this removes those of runs that never finished.
  rule {
    id     = "expire-checkpoints"
    status = "Enabled"
    filter {
      prefix = "checkpoints/"
    }
    expiration {
      days = var.checkpoint_expiry_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }

  # Versioning keeps overwritten outputs recoverable for a while, not forever.
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
  }
}

data "aws_iam_policy_document" "tls_only" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.data.arn, "${aws_s3_bucket.data.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "data" {
  bucket = aws_s3_bucket.data.id
  policy = data.aws_iam_policy_document.tls_only.json
  # The public access block must exist first, or S3 may judge the policy while it is unprotected.
  depends_on = [aws_s3_bucket_public_access_block.data]
}

# --- Image repository -------------------------------------------------------------------------

resource "aws_ecr_repository" "image" {
  name                 = var.name
  image_tag_mutability = "IMMUTABLE"
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
  }
}

# --- The role the Job's service account assumes (IRSA / web identity) ------------------------

data "aws_iam_policy_document" "trust" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${var.service_account}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "job" {
  name               = "${var.name}-job"
  description        = "Assumed by the sdft Job's service account ${var.namespace}/${var.service_account}"
  assume_role_policy = data.aws_iam_policy_document.trust.json
}

# Least privilege: list only under the job's prefixes, read the input prefixes, read/write/delete
# the output prefixes. Nothing else in the bucket or the account.
data "aws_iam_policy_document" "job" {
  statement {
    sid       = "ListJobPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [for p in concat(var.readable_prefixes, var.writable_prefixes) : "${p}*"]
    }
  }
  statement {
    sid       = "ReadInputs"
    actions   = ["s3:GetObject"]
    resources = [for p in concat(var.readable_prefixes, var.writable_prefixes) : "${aws_s3_bucket.data.arn}/${p}*"]
  }
  statement {
    sid = "WriteOutputs"
    actions = [
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [for p in var.writable_prefixes : "${aws_s3_bucket.data.arn}/${p}*"]
  }
}

resource "aws_iam_policy" "job" {
  name        = "${var.name}-job-data"
  description = "sdft job: read inputs and write outputs under the data bucket's prefixes"
  policy      = data.aws_iam_policy_document.job.json
}

resource "aws_iam_role_policy_attachment" "job" {
  role       = aws_iam_role.job.name
  policy_arn = aws_iam_policy.job.arn
}

# --- Optional: an EKS managed node group of GPU instances ------------------------------------

data "aws_iam_policy_document" "node_trust" {
  count = var.create_gpu_node_group ? 1 : 0
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "gpu_node" {
  count              = var.create_gpu_node_group ? 1 : 0
  name               = "${var.name}-gpu-node"
  assume_role_policy = data.aws_iam_policy_document.node_trust[0].json
}

resource "aws_iam_role_policy_attachment" "gpu_node" {
  for_each = var.create_gpu_node_group ? toset([
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryReadOnly",
  ]) : toset([])
  role       = aws_iam_role.gpu_node[0].name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/${each.value}"
}

resource "aws_eks_node_group" "gpu" {
  count           = var.create_gpu_node_group ? 1 : 0
  cluster_name    = var.cluster_name
  node_group_name = "${var.name}-gpu"
  node_role_arn   = aws_iam_role.gpu_node[0].arn
  subnet_ids      = var.subnet_ids
  ami_type        = "AL2023_x86_64_NVIDIA"
  instance_types  = var.gpu_instance_types
  capacity_type   = var.gpu_capacity_type

  scaling_config {
    min_size     = 0
    desired_size = 0
    max_size     = var.gpu_max_nodes
  }

  # Only pods that tolerate GPUs (the job does) land on these expensive nodes.
  taint {
    key    = "nvidia.com/gpu"
    value  = "true"
    effect = "NO_SCHEDULE"
  }

  lifecycle {
    ignore_changes = [scaling_config[0].desired_size]
  }

  depends_on = [aws_iam_role_policy_attachment.gpu_node]
}
