package org.pytorch.serve.http.api.rest;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.QueryStringDecoder;
import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.Map;
import org.pytorch.serve.archive.DownloadArchiveException;
import org.pytorch.serve.archive.model.ModelException;
import org.pytorch.serve.archive.model.ModelVersionNotFoundException;
import org.pytorch.serve.archive.workflow.WorkflowException;
import org.pytorch.serve.http.HttpRequestHandlerChain;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.NettyUtils;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.ModelVersionedRefs;
import org.pytorch.serve.wlm.WorkerInitializationException;

/**
 * mrl-serve's Open Inference Protocol (v2) routes for TorchServe 0.12, in place of the frontend's
 * own class of this name (model_store/java/mrl/oip/Agent.java swaps it in as the JVM loads it).
 *
 * <p>It is the last link of the inference chain: POST /v2/models/{m}/infer never reaches it (the
 * inference handler takes it first and passes it to our Python handler). It answers:
 *
 * <ul>
 *   <li>GET /v2: server metadata (TorchServe's said "extenstion"; the protocol says "extensions");
 *   <li>GET /v2/health/live: the frontend answers;
 *   <li>GET /v2/health/ready: every registered model has a healthy worker (TorchServe said true
 *       whatever its workers did);
 *   <li>GET /v2/models/{m}[/versions/{v}]: name, versions, platform, inputs and outputs, the last
 *       three from oip_metadata.json in the model's archive (model_store/build_archive.py writes
 *       it from handler/oip.py), or empty lists for an archive without one;
 *   <li>GET /v2/models/{m}[/versions/{v}]/ready: the model has a healthy worker.
 * </ul>
 *
 * <p>Readiness is a status code, as the protocol says: 200 true, 4xx false. Errors are the
 * protocol's {"error": "..."}; an unknown model is 404. Everything else goes down the chain as
 * before (so unknown routes keep TorchServe's 404).
 */
public class OpenInferenceProtocolRequestHandler extends HttpRequestHandlerChain {

    static final String METADATA_FILE = "oip_metadata.json";

    public OpenInferenceProtocolRequestHandler() {}

    @Override
    public void handleRequest(
            ChannelHandlerContext ctx,
            FullHttpRequest req,
            QueryStringDecoder decoder,
            String[] segments)
            throws ModelException, DownloadArchiveException, WorkflowException,
                    WorkerInitializationException {
        int n = segments.length;
        if (n < 2 || !"v2".equals(segments[1])) {
            chain.handleRequest(ctx, req, decoder, segments);
        } else if (n == 2) {
            serverMetadata(ctx);
        } else if (n == 4 && "health".equals(segments[2]) && "live".equals(segments[3])) {
            JsonObject body = new JsonObject();
            body.addProperty("live", true);
            NettyUtils.sendJsonResponse(ctx, body);
        } else if (n == 4 && "health".equals(segments[2]) && "ready".equals(segments[3])) {
            serverReady(ctx);
        } else if (n >= 4 && "models".equals(segments[2])) {
            modelRoute(ctx, req, decoder, segments);
        } else {
            chain.handleRequest(ctx, req, decoder, segments);
        }
    }

    private void modelRoute(
            ChannelHandlerContext ctx,
            FullHttpRequest req,
            QueryStringDecoder decoder,
            String[] segments)
            throws ModelException, DownloadArchiveException, WorkflowException,
                    WorkerInitializationException {
        // /v2/models/{m}[/versions/{v}][/ready]
        String name = segments[3];
        String version = null;
        int rest = 4;
        if (segments.length >= 6 && "versions".equals(segments[4])) {
            version = segments[5];
            rest = 6;
        }
        boolean ready = segments.length == rest + 1 && "ready".equals(segments[rest]);
        if (segments.length != rest && !ready) {
            if (version != null && segments.length == rest + 1) {
                // infer/explain on a version: TorchServe's OIP never routed these
                error(ctx, HttpResponseStatus.NOT_IMPLEMENTED, "Model versioning is not yet supported.");
            } else {
                chain.handleRequest(ctx, req, decoder, segments);
            }
            return;
        }
        ModelManager manager = ModelManager.getInstance();
        Model model;
        try {
            model = manager.getModel(name, version);
        } catch (ModelVersionNotFoundException e) {
            model = null;
        }
        if (model == null) {
            String what = version == null ? name : name + " version " + version;
            error(ctx, HttpResponseStatus.NOT_FOUND, "Model not found: " + what);
            return;
        }
        if (ready) {
            int healthy = manager.getNumHealthyWorkers(model.getModelVersionName());
            JsonObject body = new JsonObject();
            body.addProperty("name", name);
            body.addProperty("ready", healthy > 0);
            NettyUtils.sendJsonResponse(
                    ctx, body, healthy > 0 ? HttpResponseStatus.OK : HttpResponseStatus.BAD_REQUEST);
            return;
        }
        modelMetadata(ctx, manager, name, model);
    }

    private void modelMetadata(ChannelHandlerContext ctx, ModelManager manager, String name, Model model) {
        JsonObject body = new JsonObject();
        body.addProperty("name", name);
        JsonArray versions = new JsonArray();
        for (Map.Entry<String, ModelVersionedRefs> entry : manager.getAllModels()) {
            if (entry.getKey().equals(name)) {
                for (Map.Entry<String, Model> v : entry.getValue().getAllVersions()) {
                    versions.add(v.getKey());
                }
            }
        }
        body.add("versions", versions);
        JsonObject declared;
        try {
            declared = readMetadata(model.getModelDir());
        } catch (IOException | RuntimeException e) {
            error(ctx, HttpResponseStatus.INTERNAL_SERVER_ERROR,
                    "model " + name + ": unreadable " + METADATA_FILE + ": " + e.getMessage());
            return;
        }
        body.addProperty("platform", declared.has("platform")
                ? declared.get("platform").getAsString() : "torchserve");
        body.add("inputs", declared.has("inputs") ? declared.get("inputs") : new JsonArray());
        body.add("outputs", declared.has("outputs") ? declared.get("outputs") : new JsonArray());
        if (declared.has("parameters")) {
            body.add("parameters", declared.get("parameters"));
        }
        NettyUtils.sendJsonResponse(ctx, body);
    }

    private static JsonObject readMetadata(File modelDir) throws IOException {
        File file = new File(modelDir, METADATA_FILE);
        if (!file.isFile()) {
            return new JsonObject();  // an archive of another handler: name and versions only
        }
        JsonElement doc = JsonParser.parseString(
                new String(Files.readAllBytes(file.toPath()), StandardCharsets.UTF_8));
        if (!doc.isJsonObject()) {
            throw new IOException("not a JSON object");
        }
        return doc.getAsJsonObject();
    }

    private static void serverMetadata(ChannelHandlerContext ctx) {
        JsonObject body = new JsonObject();
        body.addProperty("name", "torchserve");
        body.addProperty("version", ConfigManager.getInstance().getVersion());
        JsonArray extensions = new JsonArray();
        extensions.add("model_metadata");
        extensions.add("model_ready");
        body.add("extensions", extensions);
        NettyUtils.sendJsonResponse(ctx, body);
    }

    private static void serverReady(ChannelHandlerContext ctx) {
        ModelManager manager = ModelManager.getInstance();
        StringBuilder waiting = new StringBuilder();
        for (Map.Entry<String, ModelVersionedRefs> entry : manager.getAllModels()) {
            Model model = entry.getValue().getDefaultModel();
            if (model != null && manager.getNumHealthyWorkers(model.getModelVersionName()) == 0) {
                waiting.append(waiting.length() == 0 ? "" : ", ").append(entry.getKey());
            }
        }
        JsonObject body = new JsonObject();
        body.addProperty("ready", waiting.length() == 0);
        if (waiting.length() > 0) {
            body.addProperty("error", "no healthy worker yet: " + waiting);
        }
        NettyUtils.sendJsonResponse(
                ctx, body, waiting.length() == 0 ? HttpResponseStatus.OK : HttpResponseStatus.BAD_REQUEST);
    }

    private static void error(ChannelHandlerContext ctx, HttpResponseStatus status, String message) {
        JsonObject body = new JsonObject();
        body.addProperty("error", message);
        NettyUtils.sendJsonResponse(ctx, body, status);
    }
}
